"""The adaptive softmax (Grave et al. 2017), with the tail dropout and the weight sharing of
adaptive input representations (Baevski & Auli 2019, sections 3 and 5.4, Table 7).

The frequency-ordered vocabulary is cut into bands ``V_1 .. V_n`` by ``cutoffs`` as in
:mod:`reglm.inputs.adaptive_input` (band ``i`` has dimension ``d_i = d / k^(i-1)``). From the
encoder output ``h: (d,)``:

* the **head** scores the ``c_1`` head words and one entry per tail cluster ``2 .. n``::

      z = [E_1 h' ; C h]          (c_1 + n - 1,)    p_head = softmax(z)

  with ``E_1: (c_1, d)`` the head word embeddings, ``C: (n-1, d)`` the cluster entries and ``h' =
  h`` (or ``h' = P_1^T h`` with a head projection, ``tie=head`` only);
* **tail cluster** ``i`` projects, drops, and scores its words::

      h_i = dropout(P_i^T h)      (d_i,)            p_i = softmax(E_i h_i)   over V_i

  with ``P_i: (d, d_i)`` and ``E_i: (|V_i|, d_i)``;
* ``p(w) = p_head(w)`` for a head word and ``p_head(cluster i) * p_i(w)`` for a word of band ``i``.

No biases anywhere (the authors' code has none; torch's ``AdaptiveLogSoftmaxWithLoss`` with
``head_bias=False`` computes the same function, with ``div_value = k``).

**Tail dropout** (section 5.4) is ``tail_dropout``, standard dropout on every ``h_i`` (never on
the head). **Input dropout** is ``softmax_input_dropout`` (``input_dropout`` here): the authors'
module (fairseq's ``AdaptiveSoftmax``, rate ``adaptive_softmax_dropout``) also drops its input
``h`` once, before the head and the tail projections read it, with the same rate as the tail
dropout; the paper describes only the tail dropout. Both are off in evaluation.

**Weight sharing** (``tie``; Table 7) with an adaptive input of the same cutoffs, factor and
``d``, whose band ``i`` has the embedding ``E^in_i: (|V_i|, d_i)`` and the projection ``W_i: (d, d_i)``:

=============== ============================================ =========================
``tie``         shared (one Parameter, by identity)          Table 7
=============== ============================================ =========================
``none``        nothing                                      (ADP, Table 3)
``embeddings``  ``E_1 = E^in_1`` and ``E_i = E^in_i``          tied emb, not proj
``projections`` also ``P_i = W_i`` (applied transposed)       tied emb/proj not head
``head``        also a head projection ``P_1 = W_1``          tied emb/proj + head
=============== ============================================ =========================

The ``n - 1`` cluster entries ``C`` are never shared. ``projections`` is the default: Table 7's
best (ADP-T, 19.79 valid ppl on WikiText-103); section 3 reports a head projection did worse.

With a plain **word embedding** ``L: (V, d)`` as the input layer, ``tie=embeddings`` and
``factor=1`` (every band of dimension ``d``: "no dim reduction") make every ``E_i`` the rows of
``L`` in band ``i`` (views of the one Parameter); the tail projections and ``C`` stay the layer's
own. That is Table 7's "512d Embedding / 512d Adaptive (no dim reduction, tied)" row, the
adaptive softmax of Merity et al. (2018).

**AdvSoft** (Wang et al. 2019, :mod:`reglm.outputs.adversarial`) with ``adversarial=True``: the
target's head logit (the word itself, or its cluster's entry for a tail word) is lowered by
``epsilon ||x||`` with ``x`` what that row reads (``h'`` for a head word, ``h`` for a cluster
entry), and a tail word's logit inside its cluster by ``epsilon_i ||h_i||``; in relative mode
``epsilon = alpha ||w||`` of the row being perturbed (``E_1[w]``, ``C[i]`` or ``E_i[w]``).

**Cost**: :meth:`AdaptiveSoftmax.score` never builds an ``(N, V)`` tensor -- only the head's
``(N, c_1 + n - 1)`` logits and, per cluster, the ``(n_i, |V_i|)`` logits of the ``n_i`` tokens whose
target falls in it, found with one host sync per call (the cluster sizes). :meth:`predict`
builds the full ``(B, T, V)`` log-probabilities, only when asked.

**Capabilities**: ``advsoft`` only. There are no logits whose softmax is the prediction (no
``softmax-logits``: the augmented loss cannot read it), and :meth:`full_logits` raises: the
discriminator objective reads logits through a sigmoid, and the log-probabilities (all <= 0,
so a sigmoid <= 1/2) would cripple it. Use a softmax or a mixture output there.

**Initialization** (own parameters): Xavier-uniform, as the authors' code, for ``E_1``, ``C``,
every ``P_i`` and every ``E_i``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.encoders.base import EncoderOutput
from reglm.errors import ReglmError
from reglm.inputs.adaptive_input import (
    band_dims,
    check_cutoffs_fit,
    valid_cutoffs,
)
from reglm.inputs.base import InputLayer
from reglm.layers.inference import Frozen
from reglm.outputs.adaptive_softmax_config import TIES, AdaptiveSoftmaxConfig
from reglm.outputs.adversarial import AdvSoft, perturb_target_logits_
from reglm.outputs.base import OutputLayer, OutputLoss


class AdaptiveSoftmax(OutputLayer):
    """The adaptive softmax over ``h: (..., d)``; see the module docstring.

    * ``in_features``: ``d``; ``vocab_size``: ``V``; ``cutoffs``: ``(c_1, .., c_{n-1})``;
    * ``tied_bands``: per band ``(E^in_i, W_i)`` of an adaptive input (:meth:`AdaptiveInput.band_weights`), read per
      ``tie``;
    * ``tied_matrix``: instead, the ``(V, d)`` word embedding whose band rows are every ``E_i``
      (``tie=embeddings``, ``factor=1``); registered here as ``tied_matrix``, the same Parameter.

    Parameters: ``head_weight: (c_1, d)`` (``E_1``), ``cluster_weight: (n-1, d)`` (``C``),
    ``tail_projections.j: (d, d_{j+2})`` (``P_{j+2}``, laid out as the input's projections),
    ``tail_weights.j: (|V_{j+2}|, d_{j+2})`` (``E_{j+2}``), and with ``tie=head``
    ``head_projection: (d, d)`` (``P_1``). A shared one is the input layer's Parameter itself.
    :meth:`band_weight` gives ``E_i`` whichever way it is held.
    """

    Config = AdaptiveSoftmaxConfig
    capabilities = frozenset({"advsoft"})
    skips_parameters = True
    """a tail cluster with no target in a batch gets no gradient (data-parallel training looks for unused parameters)"""

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        cutoffs: tuple[int, ...],
        factor: float = 4.0,
        tail_dropout: float = 0.0,
        tie: str = "none",
        tied_bands: list[tuple[nn.Parameter, nn.Parameter]] | None = None,
        advsoft: AdvSoft | None = None,
        tied_matrix: nn.Parameter | None = None,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        cutoffs = valid_cutoffs(cutoffs, vocab_size)
        if tie not in TIES:
            raise ValueError(f"tie must be one of {TIES}, got {tie!r}")
        if tie != "none" and tied_bands is None and (tie != "embeddings" or tied_matrix is None):
            raise ValueError(
                f"tie={tie} needs the adaptive input's tied_bands (or, for tie=embeddings, a word embedding's "
                "tied_matrix)"
            )
        self.in_features = in_features
        self.vocab_size = vocab_size
        self.cutoffs = cutoffs
        self.bounds = (0, *cutoffs, vocab_size)
        self.dims = band_dims(in_features, factor, len(cutoffs) + 1, "model.output.factor")
        self.tail_dropout = tail_dropout
        self.input_dropout = input_dropout
        self.tie = tie
        self.advsoft = advsoft
        if tied_bands is not None and tie != "none":
            self._check_tied_shapes(tied_bands)
        n = self.num_bands

        def own(*shape: int) -> nn.Parameter:
            return nn.Parameter(nn.init.xavier_uniform_(torch.empty(*shape)))

        self.cluster_weight = own(n - 1, in_features)
        self.head_projection = tied_bands[0][1] if tie == "head" else None
        if tied_matrix is not None and tied_bands is None:
            if set(self.dims) != {in_features} or tuple(tied_matrix.shape) != (vocab_size, in_features):
                raise ValueError(
                    f"a tied word embedding {tuple(tied_matrix.shape)} needs factor 1 and shape ({vocab_size}, "
                    f"{in_features})"
                )
            self.tied_matrix = tied_matrix
            self.tail_projections = nn.ParameterList(own(in_features, in_features) for _ in range(1, n))
            return
        self.tied_matrix = None
        tie_emb = tie != "none"
        tie_proj = tie in ("projections", "head")
        self.head_weight = tied_bands[0][0] if tie_emb else own(cutoffs[0], in_features)
        self.tail_projections = nn.ParameterList(
            tied_bands[i][1] if tie_proj else own(in_features, self.dims[i]) for i in range(1, n)
        )
        self.tail_weights = nn.ParameterList(
            tied_bands[i][0] if tie_emb else own(self.bounds[i + 1] - self.bounds[i], self.dims[i]) for i in range(1, n)
        )

    def _check_tied_shapes(self, tied_bands: list[tuple[nn.Parameter, nn.Parameter]]) -> None:
        expected = [
            ((self.bounds[i + 1] - self.bounds[i], d_i), (self.in_features, d_i)) for i, d_i in enumerate(self.dims)
        ]
        got = [(tuple(e.shape), tuple(p.shape)) for e, p in tied_bands]
        if got != expected:
            raise ValueError(
                f"tied bands have shapes {got}, expected {expected}; tying needs the same cutoffs, factor and dimension"
            )

    @classmethod
    def from_config(
        cls, cfg: AdaptiveSoftmaxConfig, in_features: int, vocab_size: int, input_layer: InputLayer, encoder: nn.Module
    ) -> AdaptiveSoftmax:
        cutoffs = cfg.cutoff_values
        check_cutoffs_fit(cutoffs, vocab_size, "model.output.cutoffs")
        tied, matrix = None, None
        if cfg.tie != "none":
            if "bands" in input_layer.capabilities:
                tied = input_layer.band_weights()
            elif cfg.tie == "embeddings" and "word-matrix" in input_layer.capabilities:
                matrix = input_layer.tied_weight()
            else:
                raise ReglmError(
                    f"invalid option model.output.tie: {cfg.tie} needs an input layer with bands "
                    "(model.input=adaptive); set tie=none"
                )
        return cls(
            in_features,
            vocab_size,
            cutoffs,
            cfg.factor,
            cfg.tail_dropout,
            cfg.tie,
            tied,
            cfg.advsoft.build(),
            matrix,
            cfg.softmax_input_dropout,
        )

    @property
    def num_bands(self) -> int:
        return len(self.dims)

    def band_weight(self, i: int) -> Tensor:
        """``E_i: (|V_i|, d_i)`` of (0-based) band ``i``: the layer's own, an adaptive input's, or rows of a tied word
        embedding."""
        if self.tied_matrix is not None:
            return self.tied_matrix[self.bounds[i] : self.bounds[i + 1]]
        return self.head_weight if i == 0 else self.tail_weights[i - 1]

    # ------------------------------------------------------------------ the math, on hidden states

    def band_of(self, targets: Tensor) -> Tensor:
        """The 0-based band of every word id (same shape)."""
        band = torch.zeros_like(targets)
        for c in self.cutoffs:
            band += targets >= c
        return band

    def head_input(self, h: Tensor) -> Tensor:
        """``h: (N, d) -> h': (N, d)``, what the head word embeddings read (``P_1^T h`` with a head projection)."""
        return h if self.head_projection is None else h @ self.head_projection

    def head_logits(self, h: Tensor) -> Tensor:
        """``h: (N, d) -> (N, c_1 + n - 1)``: head words, then one entry per tail cluster."""
        # join the (N, c_1) and (N, n - 1) logits, not the weights: a (c_1 + n - 1, d) copy of the
        # head every call (and its gradient copied back) cost 10-20% of the layer's time
        return torch.cat([F.linear(self.head_input(h), self.band_weight(0)), F.linear(h, self.cluster_weight)], dim=-1)

    def tail_input(self, j: int, h: Tensor) -> Tensor:
        """``h: (M, d) -> h_i: (M, d_i)`` for tail cluster ``j`` (0-based; band ``j + 2``): projected, then dropped."""
        return F.dropout(h @ self.tail_projections[j], self.tail_dropout, self.training)

    def layer_input(self, h: Tensor) -> Tensor:
        """``h: (..., d) -> (N, d)``: flattened, then dropped (``input_dropout``, in training only);
        the head and every tail cluster read this one tensor."""
        return F.dropout(h.reshape(-1, self.in_features), self.input_dropout, self.training)

    def log_probs(self, h: Tensor) -> Tensor:
        """``h: (..., d) -> (..., V)``: the full log-probabilities, in vocabulary order."""
        flat = self.layer_input(h)
        head = F.log_softmax(self.head_logits(flat), dim=-1)
        c1 = self.cutoffs[0]
        parts = [head[:, :c1]]
        for j in range(self.num_bands - 1):
            tail = F.log_softmax(F.linear(self.tail_input(j, flat), self.band_weight(j + 1)), dim=-1)
            parts.append(tail + head[:, c1 + j : c1 + j + 1])
        return torch.cat(parts, dim=-1).view(*h.shape[:-1], self.vocab_size)

    def nll_of(self, h: Tensor, targets: Tensor, adversarial: bool = False) -> Tensor:
        """``h: (..., d)``, ``targets: (...)`` -> ``(...)``: ``-log p(target)`` per token (under
        AdvSoft when ``adversarial``), without any ``(N, V)`` tensor."""
        flat_h = self.layer_input(h)
        flat_y = targets.reshape(-1)
        if adversarial and self.advsoft is None:
            raise ValueError("adversarial=True needs an output layer built with advsoft")
        adv = self.advsoft if adversarial else None
        c1 = self.cutoffs[0]
        band = self.band_of(flat_y)
        entry = torch.where(band == 0, flat_y, c1 + band - 1)
        logits = self.head_logits(flat_h)
        if adv is not None:
            x = (
                flat_h
                if self.head_projection is None
                else torch.where((band == 0).unsqueeze(-1), self.head_input(flat_h), flat_h)
            )
            rows = (
                F.embedding(entry, torch.cat([self.band_weight(0), self.cluster_weight]))
                if adv.needs_target_weight()
                else None
            )
            perturb_target_logits_(logits, entry, adv.margin(x, rows))
        nll = F.cross_entropy(logits, entry, reduction="none")
        if self.num_bands > 1:
            counts = torch.bincount(band, minlength=self.num_bands).tolist()  # the one host sync
            order = torch.argsort(band, stable=True)
            for j, positions in enumerate(order.split(counts)[1:]):
                if positions.numel() == 0:
                    continue
                h_j = self.tail_input(j, flat_h.index_select(0, positions))
                local = flat_y.index_select(0, positions) - self.bounds[j + 1]
                tail_logits = F.linear(h_j, self.band_weight(j + 1))
                if adv is not None:
                    rows = F.embedding(local, self.band_weight(j + 1)) if adv.needs_target_weight() else None
                    perturb_target_logits_(tail_logits, local, adv.margin(h_j, rows))
                nll = nll.index_add(0, positions, F.cross_entropy(tail_logits, local, reduction="none"))
        return nll.view(targets.shape)

    # ------------------------------------------------------------------ the output interface

    def score(
        self, out: EncoderOutput, targets: Tensor, adversarial: bool = False, keep_logits: bool = False
    ) -> OutputLoss:
        if keep_logits:
            raise ValueError(
                "the adaptive softmax has no logits whose softmax is the prediction (no softmax-logits capability)"
            )
        nll = self.nll_of(out.output, targets, adversarial)
        return OutputLoss(nll, nll.new_zeros(()))

    def predict(self, out: EncoderOutput) -> Tensor:
        return self.log_probs(out.output)

    def full_logits(self, out: EncoderOutput) -> Tensor:
        raise ReglmError(
            "the adaptive softmax (model.output=adaptive) has no full logits (capability 'logits'): its scores are "
            "normalized per "
            "cluster; the discriminator objective needs model.output=softmax or mos"
        )

    def export_module(self, frozen: Frozen) -> nn.Module:
        """:class:`AdaptiveSoftmaxExport`; ``P_i: (d, d_i)`` is applied as ``h @ P_i``, an
        ``nn.Linear`` with weight ``P_i^T``."""
        head_projection = None if self.head_projection is None else frozen.linear(self.head_projection.t())
        tails = [
            TailExport(frozen.linear(self.tail_projections[j].t()), frozen.linear(self.band_weight(j + 1)))
            for j in range(self.num_bands - 1)
        ]
        head = frozen.linear(self.band_weight(0))
        return AdaptiveSoftmaxExport(head, head_projection, frozen.linear(self.cluster_weight), tails)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, vocab_size={self.vocab_size}, cutoffs={self.cutoffs}, "
            f"band_dims={self.dims}, "
            f"input_dropout={self.input_dropout}, tail_dropout={self.tail_dropout}, tie={self.tie}, "
            f"advsoft={self.advsoft}"
        )


class TailExport(nn.Module):
    """One tail cluster in the export: ``log softmax(E_i (P_i^T h))`` over its words."""

    def __init__(self, projection: nn.Linear, words: nn.Linear) -> None:
        super().__init__()
        self.projection = projection
        self.words = words

    def forward(self, h: Tensor) -> Tensor:
        return F.log_softmax(self.words(self.projection(h)), dim=-1)


class AdaptiveSoftmaxExport(nn.Module):
    """The adaptive softmax's export module at evaluation (:meth:`AdaptiveSoftmax.log_probs`): the
    head's words, then every tail's words plus its cluster's head log-probability."""

    def __init__(
        self, head: nn.Linear, head_projection: nn.Linear | None, clusters: nn.Linear, tails: list[TailExport]
    ) -> None:
        super().__init__()
        self.head = head
        self.head_projection = head_projection
        self.clusters = clusters
        self.tails = nn.ModuleList(tails)
        self.c1 = head.out_features

    def forward(self, h: Tensor, layers: list[Tensor]) -> Tensor:
        head_in = h
        if self.head_projection is not None:
            head_in = self.head_projection(h)
        head = F.log_softmax(torch.cat([self.head(head_in), self.clusters(h)], dim=-1), dim=-1)
        parts = [head[..., : self.c1]]
        for j, tail in enumerate(self.tails):
            parts.append(tail(h) + head[..., self.c1 + j : self.c1 + j + 1])
        return torch.cat(parts, dim=-1)
