"""The plain softmax output layer, optionally tied to the input embedding (AWD-LSTM 4.4).

``p(w | h) = softmax(h W^T + b)_w`` over the encoder's ``output``. It implements the output
interface (:mod:`reglm.outputs.base`) with both capabilities: full logits, and the adversarial
softmax of Wang et al. (2019) (:mod:`reglm.outputs.adversarial`), which only training asks for.
The tensor-level math is :meth:`SoftmaxOutput.logits`, :meth:`SoftmaxOutput.log_probs` and
:meth:`SoftmaxOutput.nll_of` on hidden states ``h: (..., E)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, check_positive, kind_field, option
from reglm.config.kinds import component_class
from reglm.encoders.base import EncoderOutput
from reglm.layers.inference import Frozen
from reglm.outputs.adversarial import AdvSoft, AdvSoftConfig, perturb_target_logits_
from reglm.outputs.base import OutputLayer, OutputLoss


@dataclass(frozen=True)
class SoftmaxConfig(ComponentConfig):
    """A softmax over the vocabulary."""

    kind: str = kind_field(
        "softmax",
        "a softmax over the vocabulary",
    )
    tie_weights: bool = option(
        True, "share the input embedding with the output projection (Inan et al.; Press & Wolf)", arch=True
    )
    bias: bool = option(
        True, "the softmax has a bias; false: fixed at zero (Inan et al.'s reused embeddings, RE)", arch=True
    )
    init_range: float = option(0.1, "an untied projection is initialized U(-init_range, init_range)")
    advsoft: AdvSoftConfig = option(AdvSoftConfig(), "the adversarial softmax")

    def __post_init__(self) -> None:
        check_positive(self.init_range, "model.output.init_range")

    def check_with(self, model: Any) -> None:
        """A tied softmax reads the encoder output as a word embedding of the input layer's size."""
        if not self.tie_weights:
            return
        check(
            "word-matrix" in component_class("input", model.input).capabilities,
            "model.output.tie_weights",
            f"a softmax ties to a word embedding, not to input layer {model.input.kind}; set tie_weights=false",
        )
        emb = model.input.output_size
        features = model.encoder.output_size(emb)
        check(
            features == emb,
            "model.output.tie_weights",
            f"a tied softmax reads the encoder output ({features} features from encoder {model.encoder.kind}) as "
            "an embedding of "
            f"size {emb}; make them equal (model.encoder.hidden_size or last_hidden_size), set tie_weights=false, "
            "or use an output "
            "layer that projects (model.output=mos)",
        )


class SoftmaxOutput(OutputLayer):
    """``p(w | h) = softmax(h W^T + b)_w`` with ``W: (V, E)`` and ``b: (V,)``.

    With ``tied_weight`` given (weight tying, AWD-LSTM section 4.4; Inan et al., 2016; Press &
    Wolf, 2016), ``W`` is that very Parameter -- registered here as ``weight`` too, one tensor
    shared with the input embedding, not a copy. Otherwise the layer owns ``weight: (V, E)``
    initialized ``U(-init_range, init_range)``. The bias is the layer's own, initialized to zeros;
    with ``bias=False`` there is none (``b = 0``: Inan et al.'s reused embeddings, section 4).

    With ``advsoft`` given, ``score(..., adversarial=True)`` lowers each target logit by its
    AdvSoft margin ``epsilon_y ||h||`` (eq. 7); predictions and logits are always clean.
    """

    Config = SoftmaxConfig
    capabilities = frozenset({"logits", "softmax-logits", "advsoft"})

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        tied_weight: nn.Parameter | None = None,
        advsoft: AdvSoft | None = None,
        bias: bool = True,
        init_range: float = 0.1,
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

    @classmethod
    def from_config(
        cls, cfg: SoftmaxConfig, in_features: int, vocab_size: int, input_layer: nn.Module, encoder: nn.Module
    ) -> SoftmaxOutput:
        tied = input_layer.tied_weight() if cfg.tie_weights else None
        return cls(in_features, vocab_size, tied, cfg.advsoft.build(), bias=cfg.bias, init_range=cfg.init_range)

    # ------------------------------------------------------------------ the math, on hidden states

    def logits(self, h: Tensor) -> Tensor:
        """``h: (..., E) -> (..., V)``: ``h W^T + b``."""
        return F.linear(h, self.weight, self.bias)

    def log_probs(self, h: Tensor) -> Tensor:
        """``h: (..., E) -> (..., V)``: ``log softmax(h W^T + b)`` over the vocabulary."""
        return F.log_softmax(self.logits(h), dim=-1)

    def nll_of(self, h: Tensor, targets: Tensor, adversarial: bool = False) -> Tensor:
        """``h: (B, T, E)``, ``targets: (B, T)`` -> ``(B, T)``: ``-log p(targets | h)`` per token,
        under the adversarial softmax when ``adversarial`` (needs ``advsoft``)."""
        flat_h = h.reshape(-1, self.in_features)
        return self._nll_from_logits(self.logits(flat_h), flat_h, targets, adversarial)

    def _nll_from_logits(self, logits: Tensor, flat_h: Tensor, targets: Tensor, adversarial: bool) -> Tensor:
        """The NLL from ``logits: (N, V)`` of ``flat_h: (N, E)``; under AdvSoft the target logits
        are lowered in place (pass a copy if ``logits`` is needed afterwards)."""
        flat_y = targets.reshape(-1)
        if adversarial:
            if self.advsoft is None:
                raise ValueError("adversarial=True needs an output layer built with advsoft")
            target_weight = F.embedding(flat_y, self.weight) if self.advsoft.needs_target_weight() else None
            perturb_target_logits_(logits, flat_y, self.advsoft.margin(flat_h, target_weight))
        return F.cross_entropy(logits, flat_y, reduction="none").view(targets.shape)

    # ------------------------------------------------------------------ the output interface

    def score(
        self, out: EncoderOutput, targets: Tensor, adversarial: bool = False, keep_logits: bool = False
    ) -> OutputLoss:
        flat_h = out.output.reshape(-1, self.in_features)
        logits = self.logits(flat_h)
        kept = logits if keep_logits else None
        if adversarial and keep_logits:
            logits = logits.clone()
        nll = self._nll_from_logits(logits, flat_h, targets, adversarial)
        return OutputLoss(nll, nll.new_zeros(()), kept)

    def predict(self, out: EncoderOutput) -> Tensor:
        return self.log_probs(out.output)

    def full_logits(self, out: EncoderOutput) -> Tensor:
        return self.logits(out.output)

    def export_module(self, frozen: Frozen) -> nn.Module:
        """``log softmax(h W^T + b)``; a tied ``W`` stays the input layer's tensor."""
        return SoftmaxExport(frozen.linear(self.weight, self.bias, share=True))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, vocab_size={self.vocab_size}, bias={self.bias is not None}, "
            f"advsoft={self.advsoft}"
        )


class SoftmaxExport(nn.Module):
    """The softmax's export module: ``log softmax(proj(h))``."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, h: Tensor, layers: list[Tensor]) -> Tensor:
        return F.log_softmax(self.proj(h), dim=-1)
