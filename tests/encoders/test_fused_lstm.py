"""The LSTM layers' kernel call (reglm.encoders.fused_lstm): one contiguous weight buffer that
computes what the four tensors compute, the evaluation buffer rebuilt exactly when a weight
changes, and (on CUDA) no compaction warning, float32 recurrence under autocast and the fused
VD-LSTM step equal to the CPU loop."""

from __future__ import annotations

import warnings

import pytest
import torch

from reglm.encoders.awd_lstm import WeightDropLSTM
from reglm.encoders.fused_lstm import _chunk, _EvalChunk
from reglm.encoders.vd_lstm import VDLSTMLayer
from reglm.layers.dropout import keep_mask

cuda = pytest.mark.cuda


def _params(layer: torch.nn.Module) -> list[torch.Tensor]:
    return [layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0]


def test_chunk_views_one_buffer_in_order_and_computes_the_same() -> None:
    layer = WeightDropLSTM(5, 7)
    views = _chunk(_params(layer))
    base = views[0].data_ptr()
    offsets = [v.data_ptr() - base for v in views]
    sizes = [p.numel() * p.element_size() for p in _params(layer)]
    assert offsets == [0, sizes[0], sizes[0] + sizes[1], sizes[0] + sizes[1] + sizes[2]], (
        "W_ih, W_hh, b_ih, b_hh back to back"
    )
    x = torch.randn(3, 4, 5)
    state = layer.init_state(3)
    ref, h, c = torch.lstm(x, state, _params(layer), True, 1, 0.0, True, False, True)
    out, h2, c2 = torch.lstm(x, state, views, True, 1, 0.0, True, False, True)
    assert torch.equal(ref, out) and torch.equal(h, h2) and torch.equal(c, c2)
    grads = torch.autograd.grad(out.sum(), _params(layer))
    ref_grads = torch.autograd.grad(ref.sum(), _params(layer))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_eval_chunk_is_rebuilt_exactly_when_a_weight_changes() -> None:
    layer = WeightDropLSTM(4, 6)
    cache = _EvalChunk()
    first = cache.get(_params(layer))
    assert cache.get(_params(layer)) is first, "reused while nothing changed"
    with torch.no_grad():
        layer.weight_hh_l0.add_(1.0)
    second = cache.get(_params(layer))
    assert second is not first and torch.equal(second[1], layer.weight_hh_l0.detach())
    layer.load_state_dict({k: v + 1 for k, v in layer.state_dict().items()})
    third = cache.get(_params(layer))
    assert third is not second and torch.equal(third[0], layer.weight_ih_l0.detach())


@cuda
def test_cuda_weight_dropped_lstm_needs_no_compaction_and_equals_nn_lstm() -> None:
    torch.manual_seed(0)
    layer = WeightDropLSTM(8, 16, weight_dropout=0.5).cuda()
    ref = torch.nn.LSTM(8, 16, batch_first=True).cuda()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 9, 8, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.eval()
        with torch.no_grad():
            out, _ = layer(x)
            again, _ = layer(x)
        layer.train()
        train_out, _ = layer(x)
        train_out.sum().backward()
    assert not [w for w in caught if "contiguous chunk of memory" in str(w.message)], "cuDNN compacted the weights"
    torch.testing.assert_close(out, ref(x)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(out, again)
    assert layer.weight_hh_l0.grad is not None and (layer.weight_hh_l0.grad == 0).any(), (
        "DropConnect zeroes some gradient entries"
    )


@cuda
def test_cuda_lstm_runs_in_float32_under_bf16_autocast() -> None:
    layer = WeightDropLSTM(8, 16).cuda().eval()
    x = torch.randn(2, 5, 8, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        out, (h, c) = layer(x)
    assert out.dtype == h.dtype == c.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x)[0], rtol=1e-5, atol=1e-5)


@cuda
def test_cuda_fused_masked_vd_lstm_step_equals_the_cpu_loop() -> None:
    torch.manual_seed(1)
    cpu = VDLSTMLayer(6, 10, 0.1)
    gpu = VDLSTMLayer(6, 10, 0.1).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(3, 7, 6)
    mask = keep_mask((3, 10), 0.3, x)
    state = cpu.init_state(3)
    out_cpu, (h_cpu, _) = cpu(x, state, mask)
    out_gpu, (h_gpu, _) = gpu(x.cuda(), tuple(s.cuda() for s in state), mask.cuda())
    torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_gpu.cpu(), h_cpu, rtol=1e-5, atol=1e-5)
    (out_cpu**2).sum().backward()
    (out_gpu**2).sum().backward()
    for a, b in zip(_params(cpu), _params(gpu)):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-5)
