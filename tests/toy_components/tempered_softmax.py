"""A toy output layer: a softmax with a learned temperature, ``log_softmax((h W^T + b) / exp(s))``
(``W: (V, H)``, ``b: (V,)``, a scalar ``s``); ``model.output=toy-softmax``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, kind_field
from reglm.encoders.base import EncoderOutput
from reglm.layers.component import register
from reglm.layers.inference import Frozen
from reglm.outputs.base import OutputLayer, OutputLoss


@dataclass(frozen=True)
class TemperedSoftmaxConfig(ComponentConfig):
    kind: str = kind_field("toy-softmax", "a softmax with a learned temperature")


@register("output", "toy-softmax")
class TemperedSoftmax(OutputLayer):
    Config = TemperedSoftmaxConfig
    capabilities = frozenset({"logits"})

    def __init__(self, in_features: int, vocab_size: int) -> None:
        super().__init__()
        self.decoder = nn.Linear(in_features, vocab_size)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    @classmethod
    def from_config(
        cls, cfg: TemperedSoftmaxConfig, in_features: int, vocab_size: int, input_layer: nn.Module, encoder: nn.Module
    ) -> TemperedSoftmax:
        return cls(in_features, vocab_size)

    def full_logits(self, out: EncoderOutput) -> Tensor:
        return self.decoder(out.output) * torch.exp(-self.log_temperature)

    def predict(self, out: EncoderOutput) -> Tensor:
        return F.log_softmax(self.full_logits(out), dim=-1)

    def score(
        self, out: EncoderOutput, targets: Tensor, adversarial: bool = False, keep_logits: bool = False
    ) -> OutputLoss:
        nll = -self.predict(out).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return OutputLoss(nll=nll, penalty=nll.new_zeros(()))

    def export_module(self, frozen: Frozen) -> nn.Module:
        return TemperedExport(frozen.linear(self.decoder.weight, self.decoder.bias), frozen.copy(self.log_temperature))


class TemperedExport(nn.Module):
    """``forward(h, layers) -> (B, T, V)`` log-probabilities."""

    def __init__(self, decoder: nn.Linear, log_temperature: nn.Parameter) -> None:
        super().__init__()
        self.decoder = decoder
        self.log_temperature = log_temperature

    def forward(self, h: Tensor, layers: list[Tensor]) -> Tensor:
        return F.log_softmax(self.decoder(h) * torch.exp(-self.log_temperature), dim=-1)
