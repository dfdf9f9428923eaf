"""The plain softmax output layer, optionally tied to the input embedding (AWD-LSTM 4.4).

Every output layer of the toolkit offers the same three methods, which is the seam other
output layers (adversarial softmax, mixture of softmaxes, adaptive softmax) plug into:

* ``logits(h: (..., E)) -> (..., V)``
* ``log_probs(h: (..., E)) -> (..., V)``
* ``nll(h: (B, T, E), targets: (B, T), adversarial=False) -> (B, T)`` per-token negative
  log-likelihood; ``adversarial=True`` scores under the layer's adversarial softmax
  (:mod:`reglm.outputs.adversarial`), which only training asks for.

A layer that can perturb its target logits sets ``supports_advsoft = True`` and takes an
``advsoft`` argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.outputs.adversarial import AdvSoft, perturb_target_logits_


class SoftmaxOutput(nn.Module):
    """``p(w | h) = softmax(h W^T + b)_w`` with ``W: (V, E)`` and ``b: (V,)``.

    With ``tied_weight`` given (weight tying, AWD-LSTM section 4.4; Inan et al., 2016; Press &
    Wolf, 2016), ``W`` is that very Parameter -- registered here as ``weight`` too, one tensor
    shared with the input embedding, not a copy. Otherwise the layer owns ``weight: (V, E)``
    initialized ``U(-init_range, init_range)``. The bias is the layer's own, initialized to zeros;
    with ``bias=False`` there is none (``b = 0``: Inan et al.'s reused embeddings, section 4).

    With ``advsoft`` given, ``nll(..., adversarial=True)`` lowers each target logit by its
    AdvSoft margin ``epsilon_y ||h||`` (eq. 7); ``logits``/``log_probs`` are always clean.
    """

    supports_advsoft = True

    def __init__(
        self, in_features: int, vocab_size: int, tied_weight: nn.Parameter | None = None, advsoft: AdvSoft | None = None,
        bias: bool = True, init_range: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.vocab_size = vocab_size
        self.advsoft = advsoft
        if tied_weight is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, in_features).uniform_(-init_range, init_range))
        else:
            if tuple(tied_weight.shape) != (vocab_size, in_features):
                raise ValueError(
                    f"tied weight has shape {tuple(tied_weight.shape)}, expected ({vocab_size}, {in_features}); "
                    "tying needs the encoder output size to equal the embedding size"
                )
            self.weight = tied_weight
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def logits(self, h: Tensor) -> Tensor:
        """``h: (..., E) -> (..., V)``: ``h W^T + b``."""
        return F.linear(h, self.weight, self.bias)

    def log_probs(self, h: Tensor) -> Tensor:
        """``h: (..., E) -> (..., V)``: ``log softmax(h W^T + b)`` over the vocabulary."""
        return F.log_softmax(self.logits(h), dim=-1)

    def nll(self, h: Tensor, targets: Tensor, adversarial: bool = False) -> Tensor:
        """``h: (B, T, E)``, ``targets: (B, T)`` -> ``(B, T)``: ``-log p(targets | h)`` per token,
        under the adversarial softmax when ``adversarial`` (needs ``advsoft``)."""
        flat_h = h.reshape(-1, self.in_features)
        return self.nll_from_logits(self.logits(flat_h), flat_h, targets, adversarial)

    def nll_from_logits(self, logits: Tensor, flat_h: Tensor, targets: Tensor, adversarial: bool = False) -> Tensor:
        """:meth:`nll` from already computed ``logits: (N, V)`` of ``flat_h: (N, E)``, ``targets``
        of ``N`` tokens in any shape -> NLL in ``targets``' shape. Under AdvSoft the target logits
        are lowered in place: pass a copy if ``logits`` is needed afterwards."""
        flat_y = targets.reshape(-1)
        if adversarial:
            if self.advsoft is None:
                raise ValueError("adversarial=True needs an output layer built with advsoft")
            target_weight = F.embedding(flat_y, self.weight) if self.advsoft.needs_target_weight() else None
            perturb_target_logits_(logits, flat_y, self.advsoft.margin(flat_h, target_weight))
        return F.cross_entropy(logits, flat_y, reduction="none").view(targets.shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, vocab_size={self.vocab_size}, bias={self.bias is not None}, advsoft={self.advsoft}"
