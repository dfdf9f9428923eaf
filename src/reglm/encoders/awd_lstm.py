"""The AWD-LSTM encoder (Merity et al., 2017): a stack of weight-dropped LSTM layers.

Layout is batch-first throughout: embeddings ``(B, T, E)`` in, ``(B, T, H_L)`` out. The recurrent
state of layer ``l`` is ``(h, c)``, each ``(1, B, H_l)`` -- the shape the fused LSTM kernel uses.

Techniques, with the paper's sections:

* DropConnect on the hidden-to-hidden weights (section 2, "Weight-dropped LSTM"):
  :class:`WeightDropLSTM`.
* Locked (variational) dropout between layers and on the output (section 4.2).
* Independent embedding and hidden sizes (section 4.5): the first layer reads ``emb_size``
  features, the last one emits ``H_L = emb_size`` features so a tied output layer can read it,
  or ``H_L = last_hidden_size`` when set (the mixture of softmaxes projects it to ``emb_size``).
* Hidden state carried across batches and detached (truncated BPTT): the encoder is a
  :class:`~reglm.encoders.base.RecurrentStack`, its state a :class:`~reglm.encoders.base.StackState`
  of every layer's ``(h, c)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, check_prob, kind_field, option
from reglm.encoders.base import LockedDropoutStack, NarrowingStackSizes, StackLayer, zero_state
from reglm.encoders.fused_lstm import lstm_layer
from reglm.layers.dropout import keep_mask
from reglm.layers.inference import Frozen

LSTMState = tuple[Tensor, Tensor]
"""One layer's ``(h, c)``, each ``(1, B, H)``."""


class WeightDropLSTM(StackLayer):
    """One LSTM layer with DropConnect on its recurrent weight (AWD-LSTM section 2).

    The LSTM is the paper's section-2 formulation (``i, f, o, c~`` from ``W x_t + U h_{t-1}``
    plus biases, in PyTorch's gate order ``i, f, g, o``). Parameters are named like those of
    ``torch.nn.LSTM`` so state dicts interchange:

    * ``weight_ih_l0: (4H, I)`` -- the input weights ``[W^i, W^f, W^c, W^o]``;
    * ``weight_hh_l0: (4H, H)`` -- the raw recurrent weights ``[U^i, U^f, U^c, U^o]``, the
      parameter that is trained;
    * ``bias_ih_l0, bias_hh_l0: (4H,)``.

    In training mode with ``weight_dropout > 0`` one elementwise Bernoulli mask is applied to
    ``weight_hh_l0`` (with ``1 / (1 - p)`` scaling, the same as
    ``F.dropout(weight_hh_l0, p, training=True)``, sampled by :func:`keep_mask`) per forward
    call, and the fused kernel
    (``torch.lstm``, cuDNN on GPU, in float32 with cuDNN's weight layout:
    :mod:`reglm.encoders.fused_lstm`) runs with that dropped copy, so the same recurrent weights
    stay dropped at every time step of the forward and the backward pass. Gradients flow back
    through the mask to the raw parameter. Otherwise the layer computes exactly what
    ``torch.nn.LSTM(input_size, hidden_size, batch_first=True)`` computes with the same weights.

    Initialization: every weight and bias ``U(-1/sqrt(H), 1/sqrt(H))`` with ``H = hidden_size``
    (AWD-LSTM section 5; also ``torch.nn.LSTM``'s default).
    """

    state_names = ("h", "c")

    def __init__(self, input_size: int, hidden_size: int, weight_dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= weight_dropout < 1.0:
            raise ValueError(f"weight_dropout must be in [0, 1), got {weight_dropout}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_dropout = float(weight_dropout)
        self.segment_gradients = False
        gates = 4 * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(gates))
        self.bias_hh_l0 = nn.Parameter(torch.empty(gates))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All weights and biases ``U(-1/sqrt(H), 1/sqrt(H))`` (AWD-LSTM section 5)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for param in self.parameters():
            nn.init.uniform_(param, -bound, bound)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LSTMState:
        """Zero state ``(h0, c0)``, each ``(1, B, H)``, on the parameters' device/dtype by default."""
        return zero_state(self.weight_hh_l0, [(1, batch_size, self.hidden_size)] * 2, device, dtype)

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """``x: (B, T, I)``, ``state: ((1, B, H), (1, B, H))`` or None (zeros).

        Returns ``out: (B, T, H)`` (the hidden state ``h_t`` at every step) and ``(h_T, c_T)``.
        """
        if state is None:
            state = self.init_state(x.size(0), x.device, x.dtype)
        weight_hh = self.weight_hh_l0
        if self.training and self.weight_dropout > 0.0:
            weight_hh = weight_hh * keep_mask(weight_hh.shape, self.weight_dropout, weight_hh)
        return lstm_layer(self, x, state, weight_hh)

    def export_module(self, frozen: Frozen) -> nn.Module:
        return LSTMExport(self)

    def gradient_mode(self) -> None:
        """Training mode without DropConnect: deterministic, differentiable by cuDNN (which
        backpropagates only in training mode), and on the CPU differentiated by the segment kernel
        (:func:`~reglm.encoders.fused_lstm.lstm_kernel`). Dynamic evaluation's working copy uses it."""
        self.weight_dropout = 0.0
        self.segment_gradients = True
        self.train()

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, weight_dropout={self.weight_dropout}"


class LSTMExport(nn.Module):
    """The export module of an LSTM layer (this one, or VD-LSTM's): an ``nn.LSTM(batch_first=True)``
    with the layer's weights (named alike), which the exporters and the int8 quantizer know;
    ``forward(x, [h, c]) -> (out, [h_T, c_T])``, every tensor of the state ``(1, B, H)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        ref = layer.weight_hh_l0
        self.lstm = nn.LSTM(layer.input_size, layer.hidden_size, batch_first=True, device=ref.device, dtype=ref.dtype)
        self.lstm.load_state_dict({name: p.detach() for name, p in layer.named_parameters()})
        self.lstm.requires_grad_(False)

    def forward(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        out, (h, c) = self.lstm(x, (state[0], state[1]))
        return out, [h, c]


@dataclass(frozen=True)
class AWDLSTMConfig(NarrowingStackSizes, ComponentConfig):
    """The AWD-LSTM encoder: weight-dropped LSTM layers with locked dropout between them."""

    kind: str = kind_field(
        "awd-lstm",
        "Merity et al.'s AWD-LSTM",
    )
    hidden_size: int = option(256, "LSTM hidden size of every layer but the last", arch=True)
    last_hidden_size: int | None = option(
        None,
        "hidden size of the last layer (none: the input size, so a tied softmax reads it; MoS's nhidlast)",
        arch=True,
    )
    num_layers: int = option(2, "number of stacked LSTM layers", arch=True)
    hidden_dropout: float = option(0.1, "locked dropout between LSTM layers")
    output_dropout: float = option(0.1, "locked dropout on the last layer's output")
    weight_dropout: float = option(0.0, "DropConnect on the hidden-to-hidden weights (AWD-LSTM section 2)")

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers"):
            check(getattr(self, name) >= 1, f"model.encoder.{name}", f"{getattr(self, name)} must be >= 1")
        check(
            self.last_hidden_size is None or self.last_hidden_size >= 1,
            "model.encoder.last_hidden_size",
            f"{self.last_hidden_size} must be >= 1 or none",
        )
        for name in ("hidden_dropout", "output_dropout", "weight_dropout"):
            check_prob(getattr(self, name), f"model.encoder.{name}")

    def widths(self) -> dict[str, int]:
        last = {} if self.last_hidden_size is None else {"last_hidden_size": self.last_hidden_size}
        return {"hidden_size": self.hidden_size, **last}


class AWDLSTMEncoder(LockedDropoutStack):
    """A stack of ``cfg.num_layers`` :class:`WeightDropLSTM` layers (AWD-LSTM sections 2, 4.2, 4.5).

    Layer ``l`` reads ``input_size`` features (the embedding size ``E``) when ``l = 0`` and
    ``hidden_size`` otherwise; its own hidden size ``H_l`` is ``hidden_size`` except for the last
    layer, whose ``H_l = E``
    (section 4.5), so that with tied weights the output embedding reads the encoder output
    directly -- or ``H_l = cfg.last_hidden_size`` when that is set (the MoS recipes' ``nhidlast``;
    the mixture's latent projection then maps it to ``emb_size``). Every layer applies DropConnect
    ``cfg.weight_dropout`` to its recurrent weight.
    Locked dropout ``cfg.hidden_dropout`` is applied to the output of every layer but the last
    (the input of the next layer) and ``cfg.output_dropout`` to the last layer's output.

    Initialization (section 5): "all other weights were initialized between
    [-1/sqrt(H), 1/sqrt(H)], where H is the hidden size". We follow the reference code's reading,
    where H is each layer's own hidden size ``H_l`` -- so the last layer is initialized with
    ``1/sqrt(H_L)``.
    """

    Config = AWDLSTMConfig
    stream_dim = 1

    def __init__(self, cfg: AWDLSTMConfig, input_size: int) -> None:
        out_sizes = cfg.layer_sizes(input_size)
        in_sizes = [input_size] + out_sizes[:-1]
        layers = [WeightDropLSTM(i, h, cfg.weight_dropout) for i, h in zip(in_sizes, out_sizes)]
        super().__init__(layers, cfg.hidden_dropout, cfg.output_dropout)

    @classmethod
    def from_config(cls, cfg: AWDLSTMConfig, input_size: int) -> AWDLSTMEncoder:
        return cls(cfg, input_size)
