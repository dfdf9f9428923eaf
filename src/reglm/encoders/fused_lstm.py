"""The fused LSTM kernel call of the LSTM encoders, with cuDNN's weight layout and a fixed precision.

Both LSTM layers (:class:`~reglm.encoders.awd_lstm.WeightDropLSTM`, the unmasked path of
:class:`~reglm.encoders.vd_lstm.VDLSTMLayer`) run one layer through ``torch.lstm`` here.

* **Weight layout on CUDA.** cuDNN reads a layer's four tensors ``[W_ih, W_hh, b_ih, b_hh]``
  from one contiguous buffer; handed four separate tensors, it compacts them into a new buffer
  at every call and warns ("RNN module weights are not part of single contiguous chunk of
  memory"). On CUDA they are therefore passed as views of one buffer laid out in that order: in
  evaluation (no gradient) a buffer kept per layer and rebuilt only when a parameter changed (its
  ``_version``, which every in-place update bumps); with gradients, one concatenation per call
  into which the DropConnect-dropped ``W_hh`` goes directly (that dropped copy exists anyway), so
  the gradient reaches the parameters through it. On the CPU the tensors go as they are: the CPU
  kernel reads them in place, and the CPU numbers stay those of every earlier version.
* **Precision.** The recurrence runs in float32 with a float32 state whatever autocast says:
  under CUDA autocast PyTorch's cuDNN RNN path casts to float16, not bfloat16, and re-flattens
  per call, and a low-precision carried state would be checkpointed so. Mixed precision
  (``train.precision=bf16``) thus applies to the output layer and the Transformer, not to LSTMs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LSTMState = tuple[Tensor, Tensor]


def _chunk(params: list[Tensor]) -> list[Tensor]:
    """``params`` copied into one contiguous buffer, returned as views of it (differentiable)."""
    flat = torch.cat([p.reshape(-1) for p in params])
    views, offset = [], 0
    for p in params:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return views


class _EvalChunk:
    """A layer's parameters in one buffer for gradient-free calls, rebuilt when one of them changed."""

    def __init__(self) -> None:
        self.key: tuple[tuple[int, int], ...] | None = None
        self.views: list[Tensor] = []

    def get(self, params: list[Tensor]) -> list[Tensor]:
        key = tuple((p.data_ptr(), p._version) for p in params)
        if key != self.key:
            self.views = _chunk([p.detach() for p in params])
            self.key = key
        return self.views


def lstm_layer(layer: nn.Module, x: Tensor, state: LSTMState, weight_hh: Tensor) -> tuple[Tensor, LSTMState]:
    """One unidirectional batch-first LSTM layer over ``x: (B, T, I)`` from ``state`` with the
    layer's ``weight_ih_l0``, ``bias_ih_l0``, ``bias_hh_l0`` and the given recurrent weight
    (the layer's own, or a DropConnect-dropped copy). Returns ``out: (B, T, H)`` and ``(h, c)``."""
    params = [layer.weight_ih_l0, weight_hh, layer.bias_ih_l0, layer.bias_hh_l0]
    if x.is_cuda:
        if torch.is_grad_enabled():
            params = _chunk(params)
        else:
            cache = layer.__dict__.setdefault("_eval_chunk", _EvalChunk())
            params = cache.get(params)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            h0, c0 = state
            out, h, c = torch.lstm(x.float(), (h0.float(), c0.float()), [p.float() for p in params], True, 1, 0.0, layer.training, False, True)
    else:
        # torch.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        out, h, c = torch.lstm(x, state, params, True, 1, 0.0, layer.training, False, True)
    return out, (h, c)
