"""The VD-LSTM encoder (Inan, Khosravi & Socher, 2017): a 2-layer LSTM with tied variational dropout.

Inan et al.'s baseline ("variational dropout LSTM", section 6.1) is the LSTM language model of
Zaremba et al. (2014) -- ``num_layers`` LSTM layers with the same number of units ``H`` each --
trained with a variant of Gal's variational dropout (appendix A):

* one dropout mask per sequence ("the same dropout mask for each example through the unrolled
  network"): a mask ``m_l: (B, H)`` is sampled once per forward call for every layer ``l`` and
  shared by all time steps;
* the masks on the hidden states are tied further than in Gal (2015): the same ``m_l`` multiplies
  ``h^l_{t-1}`` when it is fed back as the recurrent state of layer ``l`` and ``h^l_t`` when it is
  the input of layer ``l + 1`` (for the last layer: the encoder output the softmax reads);
* one dropout probability ``p`` for all of them ("the same dropout probability for inputs and
  hidden states"). The dropout of the embedded words (the first layer's input), if any, belongs
  to the model's input layer, not to this encoder.

Layout is batch-first throughout: embeddings ``(B, T, E)`` in, ``(B, T, H)`` out. The recurrent
state of every layer is ``(h, c)``, each ``(1, B, H)``, as in :mod:`reglm.encoders.awd_lstm`, and
the state it carries is the undropped one (the mask is applied where the state is read).

Without dropout (eval mode or ``p == 0``) every layer runs the fused LSTM kernel and the encoder
computes exactly what ``torch.nn.LSTM(E, H, num_layers, batch_first=True)`` computes with the same
weights. With dropout the recurrent part of each layer is a Python loop over time (the mask on
``h_{t-1}`` differs per stream, so it cannot be folded into the fused kernel's weights); the input
projection of all ``T`` steps is still one matrix product, and on CUDA each step is two kernels
besides the mask product: the recurrent matrix product and PyTorch's fused LSTM cell (the gate
nonlinearities and the cell update in one kernel, what ``nn.LSTMCell`` runs on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, check_positive, check_prob, kind_field, option
from reglm.encoders.awd_lstm import LSTMExport, LSTMState
from reglm.encoders.base import RecurrentStack, StackLayer, zero_state
from reglm.encoders.fused_lstm import lstm_layer
from reglm.layers.dropout import keep_mask
from reglm.layers.inference import Frozen


def _check_size(name: str, value: int) -> int:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def _check_init_range(init_range: float) -> float:
    if not init_range > 0.0:
        raise ValueError(f"init_range must be > 0, got {init_range}")
    return float(init_range)


class VDLSTMLayer(StackLayer):
    """One LSTM layer whose recurrent input ``h_{t-1}`` can be multiplied by a fixed mask.

    The LSTM is Zaremba et al.'s (``i, f, o, g`` from ``W x_t + U h_{t-1}`` plus biases, in
    PyTorch's gate order ``i, f, g, o``). Parameters are named like those of ``torch.nn.LSTM``'s
    single layer so state dicts interchange:

    * ``weight_ih_l0: (4H, I)``, ``weight_hh_l0: (4H, H)``, ``bias_ih_l0, bias_hh_l0: (4H,)``.

    ``forward(x, state, mask)``:

    * ``mask=None``: the fused kernel (``torch.lstm``, cuDNN on GPU), exactly what
      ``torch.nn.LSTM(input_size, hidden_size, batch_first=True)`` computes with the same weights;
    * ``mask: (B, H)`` (a keep mask, already scaled by ``1 / (1 - p)``): at every step
      ``gates_t = W x_t + b_ih + U (m * h_{t-1}) + b_hh`` with the same ``m`` for all ``t``
      (Inan et al., appendix A). The outputs and the returned final state are the *unmasked*
      ``h_t`` (and ``c_t``); the caller applies ``m`` to the output where it feeds the next layer.

    Initialization: every weight and bias ``U(-init_range, init_range)`` (Zaremba et al., 2014:
    0.1 for the small, 0.05 for the medium and 0.04 for the large model).
    """

    state_names = ("h", "c")

    def __init__(self, input_size: int, hidden_size: int, init_range: float) -> None:
        super().__init__()
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.init_range = _check_init_range(init_range)
        self.segment_gradients = False
        gates = 4 * self.hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(gates, self.input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gates, self.hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(gates))
        self.bias_hh_l0 = nn.Parameter(torch.empty(gates))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All weights and biases ``U(-init_range, init_range)`` (Zaremba et al., 2014)."""
        for param in self.parameters():
            nn.init.uniform_(param, -self.init_range, self.init_range)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> LSTMState:
        """Zero state ``(h0, c0)``, each ``(1, B, H)``, on the parameters' device/dtype by default."""
        return zero_state(self.weight_hh_l0, [(1, batch_size, self.hidden_size)] * 2, device, dtype)

    def forward(
        self, x: Tensor, state: LSTMState | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, LSTMState]:
        """``x: (B, T, I)``, ``state: ((1, B, H), (1, B, H))`` or None (zeros), ``mask: (B, H)`` or None.

        Returns ``out: (B, T, H)`` (the unmasked hidden state ``h_t`` at every step) and the
        unmasked ``(h_T, c_T)``, each ``(1, B, H)``.
        """
        if state is None:
            state = self.init_state(x.size(0), x.device, x.dtype)
        if mask is None:
            return lstm_layer(self, x, state, self.weight_hh_l0)
        if torch.is_autocast_enabled(x.device.type):
            # the recurrence in float32, as on the fused path (reglm.encoders.fused_lstm)
            with torch.autocast(x.device.type, enabled=False):
                return self._masked_forward(x.float(), (state[0].float(), state[1].float()), mask.float())
        return self._masked_forward(x, state, mask)

    def _masked_forward(self, x: Tensor, state: LSTMState, mask: Tensor) -> tuple[Tensor, LSTMState]:
        batch, steps, _ = x.shape
        if mask.shape != (batch, self.hidden_size):
            raise ValueError(f"mask must be (B, H) = {(batch, self.hidden_size)}, got {tuple(mask.shape)}")
        if steps == 0:
            raise ValueError("x must have at least one time step")
        # Input projection and both biases for all T steps in one product: (B*T, 4H) -> T x (B, 4H).
        bias = self.bias_ih_l0 + self.bias_hh_l0
        x_proj = torch.addmm(bias, x.reshape(batch * steps, self.input_size), self.weight_ih_l0.t())
        # unbind (not x_proj[:, t]) so that the backward pass assembles the gradient in one stack.
        x_steps = x_proj.view(batch, steps, -1).unbind(1)
        weight_hh_t = self.weight_hh_l0.t()
        h, c = state[0][0], state[1][0]
        outs: list[Tensor] = []
        for x_t in x_steps:
            if x_t.is_cuda:
                # the gate nonlinearities and the cell update in one kernel (nn.LSTMCell's on CUDA)
                h, c, _ = torch.ops.aten._thnn_fused_lstm_cell(x_t, torch.mm(mask * h, weight_hh_t), c)
            else:
                gates = torch.addmm(x_t, mask * h, weight_hh_t)
                i, f, g, o = gates.chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        return torch.stack(outs, dim=1), (h.unsqueeze(0), c.unsqueeze(0))

    def export_module(self, frozen: Frozen) -> nn.Module:
        """No mask at evaluation: the plain LSTM."""
        return LSTMExport(self)

    def gradient_mode(self) -> None:
        """Training mode for cuDNN's backward, the segment kernel on the CPU
        (:func:`~reglm.encoders.fused_lstm.lstm_kernel`); no mask is drawn while the encoder is
        in eval mode."""
        self.segment_gradients = True
        self.train()

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, init_range={self.init_range}"


@dataclass(frozen=True)
class VDLSTMConfig(ComponentConfig):
    """Zaremba et al.'s LSTM with Inan et al.'s tied variational dropout."""

    kind: str = kind_field(
        "vd-lstm",
        "Zaremba et al.'s LSTM with Inan et al.'s variational dropout",
    )
    hidden_size: int = option(256, "LSTM hidden size of every layer", arch=True)
    num_layers: int = option(2, "number of stacked LSTM layers", arch=True)
    hidden_dropout: float = option(
        0.1,
        "the one dropout probability: the per-layer masks on h_{t-1} and on the next layer's input (Inan et al. "
        "appendix A)",
    )
    init_range: float = option(0.1, "every LSTM weight is initialized U(-init_range, init_range) (Zaremba et al.)")

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers"):
            check(getattr(self, name) >= 1, f"model.encoder.{name}", f"{getattr(self, name)} must be >= 1")
        check_prob(self.hidden_dropout, "model.encoder.hidden_dropout")
        check_positive(self.init_range, "model.encoder.init_range")

    def widths(self) -> dict[str, int]:
        return {"hidden_size": self.hidden_size}

    def output_size(self, input_size: int) -> int:
        return self.hidden_size

    def layer_sizes(self, input_size: int) -> list[int]:
        return [self.hidden_size] * self.num_layers


class VDLSTMEncoder(RecurrentStack):
    """A stack of ``num_layers`` :class:`VDLSTMLayer` (Inan et al., section 6.1 and appendix A).

    Layer ``l`` reads ``emb_size`` features when ``l = 0`` and ``hidden_size`` otherwise; every
    layer has ``hidden_size`` units (Zaremba et al.'s "same number of hidden units in each
    layer"), so ``output_size = hidden_size``.

    In training mode with ``dropout = p > 0`` one keep mask ``m_l: (B, H)`` (i.i.d.
    ``Bernoulli(1 - p) / (1 - p)``, :func:`keep_mask`) is sampled per layer and forward call.
    Layer ``l`` runs with ``m_l`` on its recurrent state ``h^l_{t-1}``, and the input of layer
    ``l + 1`` is ``m_l * h^l_t`` -- the same mask at every step ``t``; the encoder ``output`` is
    ``m_L * h^L_t``. In eval mode or with ``p == 0`` no mask is applied and every layer runs the
    fused kernel (the stack then equals ``torch.nn.LSTM(emb_size, hidden_size, num_layers,
    batch_first=True)`` with the same weights).
    """

    Config = VDLSTMConfig
    stream_dim = 1

    def __init__(self, emb_size: int, hidden_size: int, num_layers: int, dropout: float, init_range: float) -> None:
        emb_size = _check_size("emb_size", emb_size)
        hidden_size = _check_size("hidden_size", hidden_size)
        num_layers = _check_size("num_layers", num_layers)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        init_range = _check_init_range(init_range)
        in_sizes = [emb_size] + [hidden_size] * (num_layers - 1)
        super().__init__([VDLSTMLayer(i, hidden_size, init_range) for i in in_sizes])
        self.dropout = float(dropout)

    @classmethod
    def from_config(cls, cfg: VDLSTMConfig, input_size: int) -> VDLSTMEncoder:
        return cls(input_size, cfg.hidden_size, cfg.num_layers, cfg.hidden_dropout, cfg.init_range)

    def step(self, li: int, x: Tensor, state: LSTMState | None, emb: Tensor) -> tuple[Tensor, LSTMState, Tensor]:
        """Layer ``l`` with its keep mask ``m_l`` (in ``emb``'s dtype) in training, none otherwise;
        the next input (the encoder ``output`` after the last layer) is ``m_l * h^l_t``."""
        layer = self.layers[li]
        mask = None
        if self.training and self.dropout > 0.0:
            mask = keep_mask((x.size(0), layer.hidden_size), self.dropout, emb)
        raw, new_state = layer(x, state, mask)
        return raw, new_state, raw if mask is None else mask.unsqueeze(1) * raw

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"
