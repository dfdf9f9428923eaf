"""The QRNN encoder (Bradbury, Merity, Xiong & Socher, 2017, "Quasi-Recurrent Neural Networks")
with the AWD-LSTM regularizers, as the AWD-LSTM reference code trains it (Merity, Keskar & Socher,
2018, "An Analysis of Neural Language Modeling at Multiple Scales"; ``salesforce/awd-lstm-lm``
with ``torchqrnn``).

One layer (section 2 of the QRNN paper, "fo-pooling") reads ``x: (B, T, I)`` and computes, with a
masked convolution of width ``k`` over time (``k = 1`` or ``2``; the input before the first one
is the carried ``x_{-1}``, zeros at the start of a stream)::

    [Z; F; O] = W [x_t; x_{t-1}] + b               (3H,)  (k = 2; k = 1 reads x_t alone)
    z_t = tanh(Z),  f_t = sigmoid(F),  o_t = sigmoid(O)
    c_t = f_t * c_{t-1} + (1 - f_t) * z_t          (fo-pooling, elementwise)
    h_t = o_t * c_t

Only the pooling is recurrent, and it is elementwise and linear in ``c``, so it is computed by a
parallel scan (:func:`fo_pool`) instead of a loop over time; :func:`fo_pool_reference` is the
readable loop it is tested against.

**The scan.** ``c_t = a_t c_{t-1} + b_t`` (``a = f``, ``b = (1 - f) z``) composes affine maps,
``(a2, b2) o (a1, b1) = (a2 a1, a2 b1 + b2)``. :func:`affine_scan` is the work-efficient odd-even
recursion: it combines neighbouring steps into pairs (one product and one multiply-add on ``T/2``
positions), solves the half-length recurrence of the pairs' maps recursively, and then fills in
the other half of the positions from their predecessors (one multiply-add) -- ``log2 T`` levels,
``O(T)`` work in all (about ``3T`` multiply-adds against the loop's ``T``), about five arithmetic
operations per level, each on all ``B x H`` channels at once, and no Python loop over time steps.
It uses only the multiplications and additions of the loop itself, associated differently: no
logarithms (a log-space cumulative sum turns ``f = 0`` into ``-inf`` and loses precision when
long sums cancel) and no divisions by cumulative products (which underflow to 0 as soon as a few
forget gates are small). The result equals the loop up to rounding (to 1e-12 in float64,
``tests/encoders/test_qrnn.py``), on any device and in any dtype; half-precision gates are pooled
in float32. The backward pass is the same scan run backwards in time (``d_t = g_t + f_{t+1}
d_{t+1}``, the gradient reaching ``c_t``), in :class:`_FoPool`, so autograd records one node per
layer rather than a few per time step. Measured speed: ``docs/qrnn.md`` (``benchmarks/qrnn.py``).

**The stack** (the reference's ``model.py`` with ``--model QRNN``): the first layer has window
``cfg.window`` (the reference: 2, "allowing the model to view discrete natural language inputs
(i.e. 'New York')"), every other layer window 1; every layer has the output gate (QRNN-fo) and
carries its last input (``save_prev_x``). Layer ``l`` reads ``input_size`` features when ``l = 0``
and ``hidden_size`` otherwise; the last layer emits ``input_size`` features (so a tied softmax
reads them; the reference's ``ninp if tie_weights``), or ``last_hidden_size`` when set --
the rule of :meth:`AWDLSTMConfig.output_size <reglm.encoders.awd_lstm.AWDLSTMConfig.output_size>`.

Regularizers, as in the reference:

* **DropConnect on the gate weights** (``weight_dropout``; the reference wraps the layer's
  ``linear`` in ``WeightDrop(['weight'])``): one :func:`~reglm.layers.dropout.keep_mask` per
  forward call on ``W`` (not on ``b``), scaled by ``1 / (1 - p)``, so every time step of the
  call uses the same dropped weights; gradients flow through the mask to the raw ``W``. Off in
  eval mode.
* **Zoneout** on ``f`` (``zoneout``, default 0 as in the reference): in training each channel at
  each step keeps its previous ``c`` with probability ``p`` (``f`` set to 1; Bradbury et al.
  section 2.1, ``F = 1 - dropout(1 - f)``), without rescaling; in eval mode ``1 - f`` is scaled by
  its expectation ``1 - p`` -- ``torchqrnn``'s zoneout, written in the paper's convention (its
  ``F`` is our ``1 - f``).
* **Locked dropout** between layers (``hidden_dropout``) and on the output (``output_dropout``):
  :class:`~reglm.layers.dropout.LockedDropout`. Embedding dropout, input dropout, tying, AR/TAR
  and the adversarial softmax belong to the input layer, the output layer and the objective.

Initialization: ``W`` and ``b`` are ``U(-1/sqrt(k I), 1/sqrt(k I))``, ``torch.nn.Linear``'s default
for the reference's ``Linear(k I, 3H)``.

Layout is batch-first throughout: ``(B, T, E)`` in, ``(B, T, H_L)`` out. The state of layer ``l``
is ``(c, x_prev)``: ``c: (B, H_l)`` and the layer's last input ``x_prev: (B, (k_l - 1) I_l)``
(width 0 for a window-1 layer), in the stack's :class:`~reglm.encoders.base.StackState` (streams
first). The reference keeps ``x_prev`` inside
the layer and clears it with ``reset()`` before every pass; here it is part of the carried state,
zero at the start of every pass like ``c``, and saved in checkpoints, so a resumed run continues
exactly. Every layer is differentiable in eval mode (no fused kernel), so dynamic evaluation
needs no ``gradient_mode``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from reglm.config.fields import ComponentConfig, check, check_prob, kind_field, option
from reglm.encoders.base import LockedDropoutStack, NarrowingStackSizes, StackLayer, zero_state
from reglm.layers.dropout import keep_mask
from reglm.layers.inference import Frozen

QRNNLayerState = tuple[Tensor, Tensor]
"""One layer's ``(c, x_prev)``: ``(B, H)`` and ``(B, (k - 1) I)``."""

WINDOWS = (1, 2)


# ---------------------------------------------------------------------- fo-pooling


def fo_pool_reference(f: Tensor, z: Tensor, c0: Tensor) -> Tensor:
    """fo-pooling step by step (QRNN section 2): ``c_t = f_t c_{t-1} + (1 - f_t) z_t``.

    ``f, z: (B, T, H)``, ``c0: (B, H)`` -> ``c: (B, T, H)``. The readable definition the scan
    (:func:`fo_pool`) is tested and benchmarked against; differentiable by autograd."""
    c = c0
    outputs: list[Tensor] = []
    for t in range(f.size(1)):
        c = f[:, t] * c + (1 - f[:, t]) * z[:, t]
        outputs.append(c)
    return torch.stack(outputs, dim=1)


def affine_scan(a: Tensor, b: Tensor, carry: Tensor, out: Tensor, reverse: bool = False) -> Tensor:
    """Solve ``out_t = a_t out_{t-1} + b_t`` (``out_{-1} = carry``) along dim 1 into ``out``; with
    ``reverse``, ``out_t = a_t out_{t+1} + b_t`` (``out_T = carry``).

    ``a, b, out: (B, T, ...)``, ``carry: (B, ...)``; ``out`` may be a strided view and must not
    overlap ``a`` or ``b``. The odd-even recursion of the module docstring: pair each step with
    the one before it in processing order, solve for the pairs' second steps recursively, then
    fill in the first steps. ``log2 T`` levels, ``O(T)`` work; no division, no logarithm.
    Returns ``out``."""
    steps = a.size(1)
    if steps <= 1:
        if steps:
            torch.addcmul(b[:, 0], a[:, 0], carry, out=out[:, 0])
        return out
    pairs, odd = divmod(steps, 2)
    if reverse:  # pair i is (odd + 2i + 1, odd + 2i), read from the right; position 0 is left over
        first, second, lone, lone_prev = slice(odd + 1, steps, 2), slice(odd, steps, 2), 0, 1
    else:  # pair i is (2i, 2i + 1); position T - 1 is left over
        first, second, lone, lone_prev = slice(0, 2 * pairs, 2), slice(1, 2 * pairs, 2), steps - 1, steps - 2
    a1, b1, a2, b2 = a[:, first], b[:, first], a[:, second], b[:, second]
    out1, out2 = out[:, first], out[:, second]
    # the pair's map, first step then second: out2 = (a2 a1) prev + (a2 b1 + b2)
    affine_scan(a2 * a1, torch.addcmul(b2, a2, b1), carry, out2, reverse)
    # each first step follows the previous pair's second step (or the carry)
    inner, edge, before = (slice(0, -1), -1, slice(1, None)) if reverse else (slice(1, None), 0, slice(0, -1))
    torch.addcmul(b1[:, inner], a1[:, inner], out2[:, before], out=out1[:, inner])
    torch.addcmul(b1[:, edge], a1[:, edge], carry, out=out1[:, edge])
    if odd:
        torch.addcmul(b[:, lone], a[:, lone], out[:, lone_prev], out=out[:, lone])
    return out


class _FoPool(torch.autograd.Function):
    """fo-pooling by :func:`affine_scan`, forward and backward, as one autograd node.

    Backward, with ``g_t = dL/dc_t`` from the layer above and ``d_t`` the total gradient at
    ``c_t``: ``d_t = g_t + f_{t+1} d_{t+1}`` (a reverse scan), then ``dL/dz_t = (1 - f_t) d_t``,
    ``dL/df_t = (c_{t-1} - z_t) d_t`` and ``dL/dc0 = f_0 d_0``; each returned in its input's dtype."""

    @staticmethod
    def forward(ctx: Any, f: Tensor, z: Tensor, c0: Tensor) -> Tensor:
        ctx.dtypes = (f.dtype, z.dtype, c0.dtype)
        dtype = torch.promote_types(torch.promote_types(f.dtype, z.dtype), torch.promote_types(c0.dtype, torch.float32))
        f, z, c0 = f.to(dtype), z.to(dtype), c0.to(dtype)
        c = torch.empty(f.shape, dtype=dtype, device=f.device)
        affine_scan(f, torch.addcmul(z, f, z, value=-1), c0, c)  # b = (1 - f) z
        ctx.save_for_backward(f, z, c0, c)
        return c

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        f, z, c0, c = ctx.saved_tensors
        f_next = F.pad(f[:, 1:], (0, 0, 0, 1))  # f_{t+1}; nothing flows in after the last step
        d = affine_scan(f_next, grad_c.to(f.dtype), torch.zeros_like(c0), torch.empty_like(c), reverse=True)
        grad_z = torch.addcmul(d, d, f, value=-1)
        grad_f = torch.empty_like(d)
        torch.sub(c[:, :-1], z[:, 1:], out=grad_f[:, 1:])
        torch.sub(c0, z[:, 0], out=grad_f[:, 0])
        grad_f.mul_(d)
        grad_c0 = f[:, 0] * d[:, 0]
        df, dz, dc0 = ctx.dtypes
        return grad_f.to(df), grad_z.to(dz), grad_c0.to(dc0)


def fo_pool(f: Tensor, z: Tensor, c0: Tensor) -> Tensor:
    """fo-pooling by the parallel scan: the same function as :func:`fo_pool_reference`.

    ``f, z: (B, T, H)``, ``c0: (B, H)`` -> ``c: (B, T, H)``, on their device, in their dtype
    (float32 for half-precision gates, so the carried ``c`` keeps full precision under autocast)."""
    return _FoPool.apply(f, z, c0)


# ---------------------------------------------------------------------- one layer


class QRNNLayer(StackLayer):
    """One QRNN-fo layer (module docstring): masked convolution of width ``window`` -> gates ->
    fo-pooling by the scan -> output gate, with DropConnect on the gate weights and zoneout.

    * ``weight: (3H, window * I)`` -- rows ``[W_z; W_f; W_o]``, columns ``[x_t; x_{t-1}]`` (the
      reference's ``linear.weight``), the raw parameter DropConnect drops a copy of;
    * ``bias: (3H,)``.
    """

    state_names = ("c", "x")

    def __init__(
        self, input_size: int, hidden_size: int, window: int = 1, weight_dropout: float = 0.0, zoneout: float = 0.0
    ) -> None:
        super().__init__()
        if window not in WINDOWS:
            raise ValueError(f"window must be 1 or 2, got {window}")
        for name, p in (("weight_dropout", weight_dropout), ("zoneout", zoneout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.window = window
        self.weight_dropout = float(weight_dropout)
        self.zoneout = float(zoneout)
        self.weight = nn.Parameter(torch.empty(3 * hidden_size, window * input_size))
        self.bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.reset_parameters()

    @property
    def prev_size(self) -> int:
        """Width of the carried inputs ``x_prev``: ``(window - 1) * input_size``."""
        return (self.window - 1) * self.input_size

    def reset_parameters(self) -> None:
        """``W`` and ``b`` ``U(-1/sqrt(k I), 1/sqrt(k I))``: ``torch.nn.Linear(k I, 3H)``'s default, the reference's."""
        bound = 1.0 / math.sqrt(self.weight.size(1))
        for param in (self.weight, self.bias):
            nn.init.uniform_(param, -bound, bound)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> QRNNLayerState:
        """Zero ``(c, x_prev)``, ``(B, H)`` and ``(B, (k - 1) I)``, on the parameters' device/dtype by default."""
        return zero_state(self.weight, [(batch_size, self.hidden_size), (batch_size, self.prev_size)], device, dtype)

    def forward(self, x: Tensor, state: QRNNLayerState | None = None) -> tuple[Tensor, QRNNLayerState]:
        """``x: (B, T, I)``, ``state`` or None (zeros) -> ``h: (B, T, H)`` and ``(c_T, x_prev)``."""
        c0, x_prev = state if state is not None else self.init_state(x.size(0), x.device, x.dtype)
        weight = self.weight
        if self.training and self.weight_dropout > 0.0:
            weight = weight * keep_mask(weight.shape, self.weight_dropout, weight)
        if self.window == 2:
            shifted = torch.cat([x_prev.unsqueeze(1), x[:, :-1]], dim=1)
            source, x_last = torch.cat([x, shifted], dim=-1), x[:, -1].clone()
        else:
            source, x_last = x, x_prev
        z, f, o = F.linear(source, weight, self.bias).chunk(3, dim=-1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        if self.zoneout > 0.0:
            if self.training:
                f = torch.where(keep_mask(f.shape, self.zoneout, f) != 0, f, 1.0)
            else:
                f = 1.0 - (1.0 - f) * (1.0 - self.zoneout)
        c = fo_pool(f, z, c0)
        # the carried state is copied out of the (B, T, .) tensors: a view would keep them alive
        # and be saved whole in a checkpoint
        return o * c, (c[:, -1].clone(), x_last)

    def export_module(self, frozen: Frozen) -> nn.Module:
        return QRNNExport(self, frozen)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, window={self.window}, "
            f"weight_dropout={self.weight_dropout}, zoneout={self.zoneout}"
        )


@torch.jit.script_if_tracing
def fo_pool_loop(f: Tensor, z: Tensor, c0: Tensor) -> Tensor:
    """:func:`fo_pool_reference`, scripted when it is traced: the exports keep it a loop over time,
    so an exported graph reads any ``T`` (a traced scan would be fixed to the traced length)."""
    return fo_pool_reference(f, z, c0)


class QRNNExport(nn.Module):
    """The export module of a :class:`QRNNLayer` in eval mode (no DropConnect; zoneout as its
    expectation): ``forward(x, state) -> (h, new state)`` with the state ``[c]`` for window 1
    (whose ``x_prev`` is empty) and ``[c, x_prev]`` for window 2, each ``(B, .)``. The gates are
    an ``nn.Linear`` (which int8 quantizes), fo-pooling the step-by-step loop."""

    def __init__(self, layer: QRNNLayer, frozen: Frozen) -> None:
        super().__init__()
        self.gates = frozen.linear(layer.weight, layer.bias)
        self.window = layer.window
        self.zoneout = layer.zoneout

    def forward(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        source = x
        if self.window == 2:
            source = torch.cat([x, torch.cat([state[1].unsqueeze(1), x[:, :-1]], dim=1)], dim=-1)
        z, f, o = self.gates(source).chunk(3, dim=-1)
        z, f, o = torch.tanh(z), torch.sigmoid(f), torch.sigmoid(o)
        if self.zoneout > 0.0:
            f = 1.0 - (1.0 - f) * (1.0 - self.zoneout)
        c = fo_pool_loop(f, z, state[0])
        if self.window == 2:
            return o * c, [c[:, -1], x[:, -1]]
        return o * c, [c[:, -1]]


# ---------------------------------------------------------------------- the encoder


@dataclass(frozen=True)
class QRNNConfig(NarrowingStackSizes, ComponentConfig):
    """The QRNN encoder: QRNN-fo layers with DropConnect and locked dropout (Merity et al. 2018's recipe)."""

    kind: str = kind_field(
        "qrnn",
        "Bradbury et al.'s quasi-recurrent network with the AWD regularizers",
    )
    hidden_size: int = option(256, "QRNN hidden size of every layer but the last", arch=True)
    last_hidden_size: int | None = option(
        None, "hidden size of the last layer (none: the input size, so a tied softmax reads it)", arch=True
    )
    num_layers: int = option(2, "number of stacked QRNN layers", arch=True)
    window: int = option(
        2,
        "width of the first layer's masked convolution over time, 1 or 2 (the others use 1; the reference: 2)",
        arch=True,
    )
    hidden_dropout: float = option(0.1, "locked dropout between QRNN layers")
    output_dropout: float = option(0.1, "locked dropout on the last layer's output")
    weight_dropout: float = option(0.0, "DropConnect on every layer's gate weights W (the reference's wdrop)")
    zoneout: float = option(
        0.0, "zoneout on the forget gates: probability that a channel keeps its previous c (Bradbury et al. 2.1)"
    )

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers"):
            check(getattr(self, name) >= 1, f"model.encoder.{name}", f"{getattr(self, name)} must be >= 1")
        check(
            self.last_hidden_size is None or self.last_hidden_size >= 1,
            "model.encoder.last_hidden_size",
            f"{self.last_hidden_size} must be >= 1 or none",
        )
        check(
            self.window in WINDOWS,
            "model.encoder.window",
            f"{self.window} must be 1 or 2 (the convolution reads x_t, or x_t and x_(t-1))",
        )
        for name in ("hidden_dropout", "output_dropout", "weight_dropout", "zoneout"):
            check_prob(getattr(self, name), f"model.encoder.{name}")


class QRNNEncoder(LockedDropoutStack):
    """A stack of ``cfg.num_layers`` :class:`QRNNLayer` layers (module docstring): window
    ``cfg.window`` for the first, 1 for the others; DropConnect ``cfg.weight_dropout`` and zoneout
    ``cfg.zoneout`` in every layer; locked dropout ``cfg.hidden_dropout`` on the output of every
    layer but the last and ``cfg.output_dropout`` on the last one's."""

    Config = QRNNConfig
    stream_dim = 0

    def __init__(self, cfg: QRNNConfig, input_size: int) -> None:
        out_sizes = cfg.layer_sizes(input_size)
        in_sizes = [input_size] + out_sizes[:-1]
        windows = [cfg.window] + [1] * (cfg.num_layers - 1)
        layers = [QRNNLayer(i, h, k, cfg.weight_dropout, cfg.zoneout) for i, h, k in zip(in_sizes, out_sizes, windows)]
        super().__init__(layers, cfg.hidden_dropout, cfg.output_dropout)

    @classmethod
    def from_config(cls, cfg: QRNNConfig, input_size: int) -> QRNNEncoder:
        return cls(cfg, input_size)
