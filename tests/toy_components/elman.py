"""A toy stateful encoder: a stack of Elman layers, ``h_t = tanh(W x_t + b_W + U h_{t-1} + b_U)``,
computed by ``torch.nn.RNN``, with locked dropout between the layers; ``model.encoder=toy-elman``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, check_prob, kind_field, option
from reglm.encoders.base import LockedDropoutStack, StackLayer, zero_state
from reglm.layers.component import register
from reglm.layers.inference import Frozen


class ElmanLayer(StackLayer):
    """One Elman layer; its state is ``(h,)``, ``h: (1, B, H)``."""

    state_names = ("h",)

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rnn = nn.RNN(input_size, hidden_size, batch_first=True)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Tensor]:
        return zero_state(self.rnn.weight_hh_l0, [(1, batch_size, self.hidden_size)], device, dtype)

    def forward(self, x: Tensor, state: tuple[Tensor] | None = None) -> tuple[Tensor, tuple[Tensor]]:
        out, h = self.rnn(x, None if state is None else state[0])
        return out, (h,)

    def export_module(self, frozen: Frozen) -> nn.Module:
        return ElmanExport(self.rnn)


class ElmanExport(nn.Module):
    """``forward(x, [h]) -> (out, [h_T])`` with a frozen copy of the layer's ``nn.RNN``."""

    def __init__(self, rnn: nn.RNN) -> None:
        super().__init__()
        self.rnn = nn.RNN(rnn.input_size, rnn.hidden_size, batch_first=True)
        self.rnn.load_state_dict(rnn.state_dict())
        self.rnn.requires_grad_(False)

    def forward(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        out, h = self.rnn(x, state[0])
        return out, [h]


@dataclass(frozen=True)
class ElmanConfig(ComponentConfig):
    """A stack of Elman layers; the last one as wide as the input (so a softmax can tie to it)."""

    kind: str = kind_field("toy-elman", "a stack of Elman layers")
    hidden_size: int = option(16, "hidden size of every layer but the last", arch=True)
    num_layers: int = option(2, "number of layers", arch=True)
    hidden_dropout: float = option(0.1, "locked dropout between layers")
    output_dropout: float = option(0.1, "locked dropout on the last layer's output")

    def __post_init__(self) -> None:
        check(
            self.hidden_size >= 1 and self.num_layers >= 1, "model.encoder", "hidden_size and num_layers must be >= 1"
        )
        check_prob(self.hidden_dropout, "model.encoder.hidden_dropout")
        check_prob(self.output_dropout, "model.encoder.output_dropout")

    def output_size(self, input_size: int) -> int:
        return input_size

    def layer_sizes(self, input_size: int) -> list[int]:
        return [self.hidden_size] * (self.num_layers - 1) + [input_size]


@register("encoder", "toy-elman")
class ElmanEncoder(LockedDropoutStack):
    Config = ElmanConfig
    stream_dim = 1

    @classmethod
    def from_config(cls, cfg: ElmanConfig, input_size: int) -> ElmanEncoder:
        sizes = cfg.layer_sizes(input_size)
        layers = [ElmanLayer(i, h) for i, h in zip([input_size, *sizes[:-1]], sizes)]
        return cls(layers, cfg.hidden_dropout, cfg.output_dropout)
