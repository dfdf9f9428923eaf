"""The LSTM kernel call of the LSTM encoders: which kernel runs a call, cuDNN's weight layout, a fixed precision.

Both LSTM layers (:class:`~reglm.encoders.awd_lstm.WeightDropLSTM`, the unmasked path of
:class:`~reglm.encoders.vd_lstm.VDLSTMLayer`) run one layer here, on the kernel
:func:`lstm_kernel` picks -- the one place that choice is made, so training, evaluation,
scoring, generation, ``next_words``, the export checks and dynamic evaluation all follow it.

* **Kernel.** CUDA calls run cuDNN. On the CPU, short gradient-free calls (a streamed token, a
  short prompt: at most :data:`CELL_MAX_STEPS` steps) run PyTorch's own LSTM cell step by step
  (:func:`~reglm.encoders.lstm_segment.cell_lstm`), because oneDNN's RNN primitive -- PyTorch's
  default CPU kernel -- reorders every weight on every call, which a short call never
  amortizes; longer calls and training run oneDNN; a layer in gradient mode (dynamic
  evaluation) is differentiated by :class:`~reglm.encoders.lstm_segment.SegmentLSTM`. The cell
  uses no global switch (``torch.backends.mkldnn``), so concurrent callers cannot disturb
  each other's kernel.
* **Weight layout on CUDA.** cuDNN reads a layer's four tensors ``[W_ih, W_hh, b_ih, b_hh]``
  from one contiguous buffer; handed four separate tensors, it compacts them into a new buffer
  at every call and warns ("RNN module weights are not part of single contiguous chunk of
  memory"). On CUDA they are therefore passed as views of one buffer laid out in that order: in
  evaluation (no gradient) a buffer kept per layer and rebuilt only when a parameter changed (its
  ``_version``, which every in-place update bumps); with gradients, one concatenation per call
  into which the DropConnect-dropped ``W_hh`` goes directly (that dropped copy exists anyway), so
  the gradient reaches the parameters through it. On the CPU the tensors go as they are.
* **Precision.** The recurrence runs in float32 with a float32 state whatever autocast says:
  under CUDA autocast PyTorch's cuDNN RNN path casts to float16, not bfloat16, and re-flattens
  per call, and a low-precision carried state would be checkpointed so. Mixed precision
  (``train.precision=bf16``) thus applies to the output layer and the Transformer, not to LSTMs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reglm.encoders.lstm_segment import cell_lstm, segment_lstm

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


CELL_MAX_STEPS = 8
"""The longest gradient-free CPU call that runs on the step-by-step cell rather than oneDNN
(:func:`lstm_kernel`): where the cell stops winning in ``benchmarks/export_latency.py --kernels``
(docs/benchmarks.md, "Exported models: streamed-token latency")."""


def lstm_kernel(x: Tensor, needs_grad: bool, segment_gradients: bool) -> str:
    """The kernel of one LSTM layer call over ``x: (B, T, I)`` -- the one place where it is
    chosen, for every caller (training, evaluation, scoring, generation, ``next_words``, the
    export checks, dynamic evaluation):

    * ``"cudnn"``: every CUDA call (``torch.lstm``);
    * ``"segment"``: a CPU call that needs gradients from a layer in gradient mode (dynamic
      evaluation's working copy): :class:`~reglm.encoders.lstm_segment.SegmentLSTM`, whose
      backward computes each weight gradient as one product for the whole segment;
    * ``"cell"``: a gradient-free CPU call of at most :data:`CELL_MAX_STEPS` steps (a streamed
      token, a short prompt): PyTorch's own cell step by step
      (:func:`~reglm.encoders.lstm_segment.cell_lstm`, the values of ``torch.lstm`` with oneDNN
      off), which reorders no weight: oneDNN's RNN primitive reorders every weight on every call,
      which a one-token call never amortizes (docs/benchmarks.md);
    * ``"onednn"``: every other CPU call (training, long windows): ``torch.lstm`` as PyTorch
      dispatches it.
    """
    if x.is_cuda:
        return "cudnn"
    if needs_grad:
        return "segment" if segment_gradients else "onednn"
    return "cell" if x.size(1) <= CELL_MAX_STEPS else "onednn"


def lstm_layer(layer: nn.Module, x: Tensor, state: LSTMState, weight_hh: Tensor) -> tuple[Tensor, LSTMState]:
    """One unidirectional batch-first LSTM layer over ``x: (B, T, I)`` from ``state`` with the
    layer's ``weight_ih_l0``, ``bias_ih_l0``, ``bias_hh_l0`` and the given recurrent weight
    (the layer's own, or a DropConnect-dropped copy), on the kernel :func:`lstm_kernel` picks
    (``layer.segment_gradients``: the layer is in gradient mode). Returns ``out: (B, T, H)``
    and ``(h, c)``."""
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
            return _run(layer, x.float(), (h0.float(), c0.float()), [p.float() for p in params])
    return _run(layer, x, state, params)


def _run(layer: nn.Module, x: Tensor, state: LSTMState, params: list[Tensor]) -> tuple[Tensor, LSTMState]:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *state, *params))
    kernel = lstm_kernel(x, needs_grad, layer.segment_gradients)
    if kernel == "segment":
        return segment_lstm(x, state, params)
    if kernel == "cell":
        return cell_lstm(x, state, params)
    # torch.lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    out, h, c = torch.lstm(x, state, params, True, 1, 0.0, layer.training, False, True)
    return out, (h, c)
