"""Adaptive input representations (Baevski & Auli 2019, section 3; Figure 1).

The frequency-ordered vocabulary (:mod:`reglm.data.vocab` gives ids by descending training
frequency) is cut into bands ``V_1 .. V_n`` by ``cutoffs`` ``c_1 < .. < c_{n-1}``::

    V_1 = [0, c_1),  V_2 = [c_1, c_2),  ...,  V_n = [c_{n-1}, V)

Band ``i`` (1-based) has its own embedding ``E_i: (|V_i|, d_i)`` with ``d_i = d / k^(i-1)`` and a
projection ``W_i: (d, d_i)`` back to the common size ``d`` -- the head band is projected too (a
``d x d`` map; section 3: "We also project V1 which already has dimension d"). A word ``w`` of
band ``i`` is represented by ``W_i E_i[w - c_{i-1}]``; ``ids: (B, T) -> (B, T, d)``.

Choices (each in :class:`AdaptiveInputConfig`):

* **No bias** on the projections (the paper's ``W_i`` are linear maps; the authors' fairseq
  module uses ``nn.Linear(d_i, d, bias=False)``), so an adaptive softmax can share them.
* **Band dimensions** are exact: ``d / k^(i-1)`` must be a whole number >= 1 for every band, else
  a config error naming ``model.input.factor`` (the authors' code floors it silently).
* **Initialization** as the authors' code: ``E_i ~ N(0, d_i^-1/2)`` (std ``d_i ** -0.5``) and
  ``W_i`` Xavier-uniform.
* **Dropout**: the authors' layer has none; their Transformer applies its dropout (0.3 on
  WikiText-103, section 4.1) to the layer's output. ``dropout`` is that dropout, as a locked
  dropout (one mask per sequence, :class:`~reglm.layers.dropout.LockedDropout`) -- the same
  option, with the same meaning, as :mod:`reglm.inputs.embedding`'s, so
  ``model.input=adaptive`` on top of an AWD-LSTM preset keeps its input dropout. Default 0
  (the layer as published). The trainer's Gaussian input noise is added to the output before it.
* **Partitioning**: one host sync per call (the band sizes, ``bincount(...).tolist()``), then per
  band one ``index_select`` of its ids, one lookup and one projection, and one ``index_copy``
  that puts all rows back in the original order. No per-token Python loop, no ``(N, V)`` tensor.

What an adaptive softmax ties to is :meth:`AdaptiveInput.band_weights`: per band the embedding
``E_i`` and the projection ``W_i`` (the Parameters themselves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, check_prob, kind_field, option
from reglm.inputs.base import InputLayer
from reglm.layers.dropout import LockedDropout
from reglm.layers.inference import Frozen


def parse_cutoffs(text: str, option_name: str) -> tuple[int, ...]:
    """``"20000,60000"`` -> ``(20000, 60000)``: at least one integer, each > 0, strictly increasing."""
    items = [item.strip() for item in str(text).split(",")]
    check(
        all(item.isdigit() for item in items),
        option_name,
        f"{text!r} must be comma-separated whole numbers, the first id of each tail band, e.g. 20000,60000",
    )
    cutoffs = tuple(int(item) for item in items)
    check(cutoffs[0] > 0, option_name, f"{text!r}: the first cutoff must be > 0 (the head band would be empty)")
    check(
        all(a < b for a, b in pairwise(cutoffs)),
        option_name,
        f"{text!r} must be strictly increasing (every band non-empty), e.g. 20000,60000",
    )
    return cutoffs


def check_cutoffs_fit(cutoffs: tuple[int, ...], vocab_size: int, option_name: str) -> None:
    """Every cutoff below ``vocab_size``, so the last band is not empty."""
    check(
        cutoffs[-1] < vocab_size,
        option_name,
        f"{','.join(map(str, cutoffs))} reaches beyond the vocabulary of {vocab_size} words; every cutoff must be "
        f"< {vocab_size} (lower the cutoffs or drop the last one)",
    )


def valid_cutoffs(cutoffs: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    """``cutoffs`` as ints, checked (a ValueError: the layers' own argument check)."""
    cutoffs = tuple(int(c) for c in cutoffs)
    if not cutoffs or cutoffs[0] <= 0 or any(a >= b for a, b in pairwise(cutoffs)) or cutoffs[-1] >= vocab_size:
        raise ValueError(f"cutoffs {cutoffs} must be non-empty, strictly increasing, > 0 and < vocab_size {vocab_size}")
    return cutoffs


def band_dims(dim: int, factor: float, num_bands: int, option_name: str) -> tuple[int, ...]:
    """``d_i = dim / factor^(i-1)`` for bands ``1 .. num_bands``, each a whole number >= 1 (else
    a config error naming ``option_name``)."""
    dims = []
    for i in range(num_bands):
        if float(factor).is_integer():
            divisor = int(factor) ** i
            exact = dim % divisor == 0
            value = dim // divisor
        else:
            quotient = dim / factor**i
            value = round(quotient)
            exact = math.isclose(quotient, value, rel_tol=0, abs_tol=1e-9)
        check(
            exact and value >= 1,
            option_name,
            f"band {i + 1} of {num_bands} would have dimension {dim} / {factor:g}^{i} = {dim / factor**i:g}, not a "
            "whole number >= 1; "
            f"choose a dimension divisible by factor^{num_bands - 1}, another factor, or fewer cutoffs",
        )
        dims.append(value)
    return tuple(dims)


@dataclass(frozen=True)
class AdaptiveInputConfig(ComponentConfig):
    """Adaptive input embeddings: frequency bands of decreasing dimension, each projected to ``dim``."""

    kind: str = kind_field(
        "adaptive",
        "adaptive input, Baevski & Auli 2019",
    )
    dim: int = option(
        1024, "d: the head band's embedding size and the layer's output size (section 4.4: 1024)", arch=True
    )
    cutoffs: str = option(
        "20000,60000",
        "comma-separated first ids of the tail bands, e.g. 20000,60000 (WikiText-103: bands 20K/40K/rest); every "
        "cutoff < the vocabulary size",
        arch=True,
    )
    factor: float = option(4.0, "k: band i has dimension dim / k^(i-1) (section 3: k = 4)", arch=True)
    dropout: float = option(
        0.0,
        "locked dropout on the layer's output (the authors apply their model's dropout there, outside the layer; "
        "0: as published)",
    )

    def __post_init__(self) -> None:
        check(self.dim >= 1, "model.input.dim", f"{self.dim} must be >= 1")
        check(
            math.isfinite(self.factor) and self.factor >= 1,
            "model.input.factor",
            f"{self.factor} must be finite and >= 1",
        )
        check_prob(self.dropout, "model.input.dropout")
        band_dims(self.dim, self.factor, len(self.cutoff_values) + 1, "model.input.factor")

    @property
    def cutoff_values(self) -> tuple[int, ...]:
        """The parsed cutoffs ``(c_1, .., c_{n-1})``."""
        return parse_cutoffs(self.cutoffs, "model.input.cutoffs")

    @property
    def output_size(self) -> int:
        return self.dim


class AdaptiveInput(InputLayer):
    """``ids: (B, T) -> (B, T, d)``; see the module docstring.

    Parameters: ``weights.i: (|V_i|, d_i)`` (band ``i+1``'s embedding) and ``projections.i: (d,
    d_i)`` (its projection, laid out as ``nn.Linear(d_i, d).weight``), ``i = 0 .. n-1``.
    """

    Config = AdaptiveInputConfig
    capabilities = frozenset({"bands"})
    skips_parameters = True
    """a band with no token in a batch gets no gradient (data-parallel training looks for unused parameters)"""

    def __init__(
        self, vocab_size: int, dim: int, cutoffs: tuple[int, ...], factor: float = 4.0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        cutoffs = valid_cutoffs(cutoffs, vocab_size)
        self.vocab_size = vocab_size
        self.dim = dim
        self.output_size = dim
        self.cutoffs = cutoffs
        self.bounds = (0, *cutoffs, vocab_size)
        self.dims = band_dims(dim, factor, len(cutoffs) + 1, "model.input.factor")
        self.weights = nn.ParameterList()
        self.projections = nn.ParameterList()
        for i, d_i in enumerate(self.dims):
            weight = nn.Parameter(torch.empty(self.bounds[i + 1] - self.bounds[i], d_i))
            nn.init.normal_(weight, mean=0.0, std=d_i**-0.5)
            projection = nn.Parameter(torch.empty(dim, d_i))
            nn.init.xavier_uniform_(projection)
            self.weights.append(weight)
            self.projections.append(projection)
        self.dropout = LockedDropout(dropout)

    @classmethod
    def from_config(cls, cfg: AdaptiveInputConfig, vocab_size: int, vocab: object = None) -> AdaptiveInput:
        cutoffs = cfg.cutoff_values
        check_cutoffs_fit(cutoffs, vocab_size, "model.input.cutoffs")
        return cls(vocab_size, cfg.dim, cutoffs, cfg.factor, cfg.dropout)

    @property
    def num_bands(self) -> int:
        return len(self.dims)

    def band_weights(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Per band, first to last: ``(E_i: (|V_i|, d_i), W_i: (d, d_i))``, the Parameters an
        adaptive softmax ties to."""
        return [(self.weights[i], self.projections[i]) for i in range(self.num_bands)]

    def band_of(self, ids: Tensor) -> Tensor:
        """The 0-based band of every id (same shape as ``ids``)."""
        band = torch.zeros_like(ids)
        for c in self.cutoffs:
            band += ids >= c
        return band

    def embed(self, ids: Tensor) -> Tensor:
        """``ids: (...) -> (..., d)``: ``W_i E_i[id - c_{i-1}]``, without dropout or noise."""
        flat = ids.reshape(-1)
        band = self.band_of(flat)
        counts = torch.bincount(band, minlength=self.num_bands).tolist()  # the one host sync
        order = torch.argsort(band, stable=True)
        rows = []
        for i, positions in enumerate(order.split(counts)):
            if positions.numel() == 0:
                continue
            local = flat.index_select(0, positions) - self.bounds[i]
            rows.append(F.linear(F.embedding(local, self.weights[i]), self.projections[i]))
        sorted_rows = torch.cat(rows) if rows else flat.new_empty((0, self.dim), dtype=self.projections[0].dtype)
        out = sorted_rows.new_empty((flat.numel(), self.dim)).index_copy(0, order, sorted_rows)
        return out.view(*ids.shape, self.dim)

    def forward(self, ids: Tensor, noise_std: float = 0.0) -> Tensor:
        """``ids: (B, T) -> (B, T, d)``; ``noise_std``: the training-only input noise."""
        x = self.embed(ids)
        if self.training and noise_std > 0:
            x = x + noise_std * torch.randn_like(x)
        return self.dropout(x)

    def export_module(self, frozen: Frozen) -> nn.Module:
        """:class:`BandLookup`: every token looked up in every band, the one it falls in kept."""
        spans = zip(pairwise(self.bounds), self.band_weights())
        return BandLookup([BandExport(lo, hi, frozen.embedding(e), frozen.linear(p)) for (lo, hi), (e, p) in spans])

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, dim={self.dim}, cutoffs={self.cutoffs}, band_dims={self.dims}"


class BandExport(nn.Module):
    """One band ``[lo, hi)`` of the export module: ``W_i E_i[id - lo]`` (``(..., d)``), ids clamped into the band."""

    def __init__(self, lo: int, hi: int, embedding: nn.Embedding, projection: nn.Linear) -> None:
        super().__init__()
        self.lo = lo
        self.hi = hi
        self.embedding = embedding
        self.projection = projection

    def forward(self, tokens: Tensor) -> Tensor:
        local = (tokens - self.lo).clamp(0, self.hi - self.lo - 1)
        return self.projection(self.embedding(local))


class BandLookup(nn.Module):
    """``tokens: (B, T) -> (B, T, d)``: each token's vector from the band it falls in (the head
    band's, replaced by each tail band's from its first id on). Unlike :meth:`AdaptiveInput.embed`,
    which sorts tokens by band, this needs no data-dependent shapes (the export's choice)."""

    def __init__(self, bands: list[BandExport]) -> None:
        super().__init__()
        self.head = bands[0]
        self.tails = nn.ModuleList(bands[1:])

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.head(tokens)
        for band in self.tails:
            out = torch.where((tokens >= band.lo).unsqueeze(-1), band(tokens), out)
        return out
