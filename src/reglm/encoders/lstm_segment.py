"""One LSTM layer over a short segment with a hand-written backward pass, for dynamic evaluation on the CPU.

Dynamic evaluation (:mod:`reglm.evaluate.dynamic`) differentiates every 5-token segment at
batch 1. PyTorch's CPU LSTM backward then writes a full ``4H x H`` (and ``4H x I``) weight
gradient for *every time step* -- a rank-1 product each -- and sums them: at the PTB shape that
is most of the segment's cost. :class:`SegmentLSTM` keeps the activated gates of the forward pass
and computes each weight gradient once for the whole segment:

    dG_t = dL/d(pre-activation gates at t),  dW_ih = sum_t dG_t^T x_t = dG^T X,
    dW_hh = dG^T H_prev,  db_ih = db_hh = sum_t dG_t,  dX = dG W_ih

with ``dG: (T*B, 4H)`` assembled by the backward recurrence (one ``(B, 4H) x (4H, H)`` product per
step for ``dh_{t-1}``). The forward pass is PyTorch's CPU cell written out with the same
operations in the same order (the input projection of all steps with ``b_ih`` in one product,
then per step ``h W_hh^T + b_hh`` plus it, gates ``i, f, g, o``), so its values are those of
``torch.lstm`` with oneDNN off.

Derivatives (gate order ``i, f, g, o``; ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``)::

    dh = dout_t + dh_next,   dc = dc_next + dh o (1 - tanh^2 c_t)
    dG_t = [dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dh tanh(c_t) o(1-o)]
    dc_next = dc f,  dh_next = dG_t W_hh
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def cell_steps(x: Tensor, h0: Tensor, c0: Tensor, params: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch's CPU LSTM cell, step by step, on ``x: (B, T, I)`` from ``h0, c0: (1, B, H)`` with
    ``params = [W_ih, W_hh, b_ih, b_hh]``: the same operations in the same order as ``torch.lstm``
    with oneDNN off, so the same values. Returns, time-major, the activated gates ``(T, B, 4H)``
    (``i, f, g, o``), the cells ``c_0 .. c_T`` and hidden states ``h_0 .. h_T`` ``(T + 1, B, H)``,
    and ``tanh(c_1) .. tanh(c_T)`` ``(T, B, H)``."""
    w_ih, w_hh, b_ih, b_hh = params
    x_t = x.transpose(0, 1)
    steps, batch = x_t.shape[:2]
    hidden = w_hh.size(1)
    projected = F.linear(x_t, w_ih, b_ih)
    gates = x.new_empty(steps, batch, 4 * hidden)
    cells = x.new_empty(steps + 1, batch, hidden)
    hs = x.new_empty(steps + 1, batch, hidden)
    tanh_c = x.new_empty(steps, batch, hidden)
    hs[0], cells[0] = h0[0], c0[0]
    for t in range(steps):
        i, f, g, o = torch.addmm(b_hh, hs[t], w_hh.t(), out=gates[t]).add_(projected[t]).unsafe_chunk(4, 1)
        i.sigmoid_()
        f.sigmoid_()
        g.tanh_()
        o.sigmoid_()
        torch.add(f * cells[t], i * g, out=cells[t + 1])
        torch.tanh(cells[t + 1], out=tanh_c[t])
        torch.mul(o, tanh_c[t], out=hs[t + 1])
    return gates, cells, hs, tanh_c


def cell_lstm(x: Tensor, state: tuple[Tensor, Tensor], params: list[Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``torch.lstm``'s batch-first single-layer call without autograd, by :func:`cell_steps`."""
    _, cells, hs, _ = cell_steps(x, state[0], state[1], params)
    steps = cells.size(0) - 1
    return hs[1:].transpose(0, 1).contiguous(), (hs[steps:], cells[steps:])


class SegmentLSTM(torch.autograd.Function):
    """``(x, h0, c0, W_ih, W_hh, b_ih, b_hh) -> (out, h_T, c_T)`` for ``x: (B, T, I)``, ``h0, c0:
    (1, B, H)``; ``out: (B, T, H)``, ``h_T, c_T: (1, B, H)`` (batch-first, as ``torch.lstm``)."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        gates, cells, hs, tanh_c = cell_steps(x, h0, c0, [w_ih, w_hh, b_ih, b_hh])
        ctx.save_for_backward(x, w_ih, w_hh, gates, cells, hs, tanh_c)
        steps = gates.size(0)
        return hs[1:].transpose(0, 1).contiguous(), hs[steps:].clone(), cells[steps:].clone()

    @staticmethod
    def backward(ctx: Any, d_out: Tensor | None, d_h: Tensor | None, d_c: Tensor | None) -> tuple[Tensor | None, ...]:
        x, w_ih, w_hh, gates, cells, hs, tanh_c = ctx.saved_tensors
        steps, batch, four_h = gates.shape
        hidden = four_h // 4
        i, f, g, o = gates.unsafe_chunk(4, 2)
        # per-step factors, for the whole segment at once: dG = [dc * a_i, dc * a_f, dc * a_g, dh * a_o]
        factors = torch.cat([g * i * (1 - i), cells[:-1] * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], dim=2)
        o_dtanh = o * (1 - tanh_c * tanh_c)
        d_gates = torch.empty_like(gates)
        dh_next = torch.zeros_like(hs[0]) if d_h is None else d_h[0].clone()
        dc_next = torch.zeros_like(cells[0]) if d_c is None else d_c[0].clone()
        d_out_t = None if d_out is None else d_out.transpose(0, 1)
        for t in range(steps - 1, -1, -1):
            dh = dh_next if d_out_t is None else dh_next.add_(d_out_t[t])
            dc = dc_next.addcmul_(dh, o_dtanh[t])
            dg_t = d_gates[t]
            torch.mul(
                dc.unsqueeze(1),
                factors[t, :, : 3 * hidden].view(batch, 3, hidden),
                out=dg_t[:, : 3 * hidden].view(batch, 3, hidden),
            )
            torch.mul(dh, factors[t, :, 3 * hidden :], out=dg_t[:, 3 * hidden :])
            dc_next = dc * f[t]
            dh_next = torch.mm(dg_t, w_hh)
        flat = d_gates.view(steps * batch, four_h)
        x_flat = x.transpose(0, 1).reshape(steps * batch, -1)
        d_x = torch.mm(flat, w_ih).view(steps, batch, -1).transpose(0, 1) if ctx.needs_input_grad[0] else None
        d_w_ih = torch.mm(flat.t(), x_flat) if ctx.needs_input_grad[3] else None
        d_w_hh = torch.mm(flat.t(), hs[:-1].reshape(steps * batch, hidden)) if ctx.needs_input_grad[4] else None
        d_bias = flat.sum(0)
        return d_x, dh_next.unsqueeze(0), dc_next.unsqueeze(0), d_w_ih, d_w_hh, d_bias, d_bias.clone()


def segment_lstm(x: Tensor, state: tuple[Tensor, Tensor], params: list[Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """``torch.lstm``'s batch-first single-layer call (``params = [W_ih, W_hh, b_ih, b_hh]``)
    through :class:`SegmentLSTM`: the same values, each weight gradient one matrix product."""
    out, h, c = SegmentLSTM.apply(x, state[0], state[1], *params)
    return out, (h, c)
