"""The LSTM kernels of reglm.encoders.lstm_segment and the one place that picks a kernel
(reglm.encoders.fused_lstm.lstm_kernel): the step-by-step cell computes torch.lstm's values, the
segment kernel's hand-written backward equals autograd through torch.nn.LSTM (float64, to
rounding) and passes gradcheck, and every caller gets the kernel the rule names."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import reglm.encoders.fused_lstm as fused_lstm
from reglm.encoders.awd_lstm import WeightDropLSTM
from reglm.encoders.fused_lstm import CELL_MAX_STEPS, lstm_kernel
from reglm.encoders.lstm_segment import SegmentLSTM, cell_lstm, segment_lstm
from reglm.encoders.vd_lstm import VDLSTMLayer

# float64 sums of a few dozen products, in another order than autograd's: 1e-12 is 10^4 ulps
FLOAT64 = {"rtol": 1e-12, "atol": 1e-12}


def _params(lstm: torch.nn.Module) -> list[torch.Tensor]:
    return [lstm.weight_ih_l0, lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0]


@pytest.mark.parametrize("batch, steps", [(1, 5), (3, 4), (2, 1)])
@pytest.mark.parametrize("onednn", [True, False])
def test_segment_backward_equals_autograd_through_nn_lstm_in_float64(
    batch: int, steps: int, onednn: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    lstm = torch.nn.LSTM(6, 7, batch_first=True).double()
    x = torch.randn(batch, steps, 6, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(1, batch, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weights = [
        torch.randn(batch, steps, 7, dtype=torch.float64),
        torch.randn(1, batch, 7, dtype=torch.float64),
        torch.randn(1, batch, 7, dtype=torch.float64),
    ]
    inputs = [x, h0, c0, *_params(lstm)]

    def objective(out: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (out * weights[0]).sum() + (h * weights[1]).sum() + (c * weights[2]).sum()

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", onednn)
    ref_out, (ref_h, ref_c) = lstm(x, (h0, c0))
    expected = torch.autograd.grad(objective(ref_out, ref_h, ref_c), inputs)
    out, (h, c) = segment_lstm(x, (h0, c0), _params(lstm))
    got = torch.autograd.grad(objective(out, h, c), inputs)
    assert_close(out, ref_out, **FLOAT64)
    assert_close((h, c), (ref_h, ref_c), **FLOAT64)
    for name, g, e in zip(["x", "h0", "c0", "W_ih", "W_hh", "b_ih", "b_hh"], got, expected):
        assert_close(g, e, **FLOAT64, msg=name)


def test_segment_backward_passes_gradcheck_and_takes_only_the_output() -> None:
    lstm = torch.nn.LSTM(3, 4, batch_first=True).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda *a: SegmentLSTM.apply(*a), (x, h0, c0, *_params(lstm)))
    out, _ = segment_lstm(x, (h0, c0), _params(lstm))
    grads = torch.autograd.grad(out.sum(), _params(lstm))
    expected = torch.autograd.grad(lstm(x, (h0, c0))[0].sum(), _params(lstm))
    assert_close(grads, expected, **FLOAT64)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, FLOAT64), (torch.float32, {"rtol": 1e-6, "atol": 1e-6})])
def test_cell_computes_what_torch_lstm_computes(dtype: torch.dtype, tolerance: dict) -> None:
    lstm = torch.nn.LSTM(5, 6, batch_first=True).to(dtype)
    x = torch.randn(3, 4, 5, dtype=dtype)
    state = (torch.randn(1, 3, 6, dtype=dtype), torch.randn(1, 3, 6, dtype=dtype))
    with torch.no_grad():
        out, (h, c) = cell_lstm(x, state, _params(lstm))
        ref_out, (ref_h, ref_c) = lstm(x, state)
    assert out.is_contiguous() and out.shape == ref_out.shape
    assert_close((out, h, c), (ref_out, ref_h, ref_c), **tolerance)


def test_the_kernel_rule() -> None:
    short, long = torch.zeros(2, CELL_MAX_STEPS, 3), torch.zeros(2, CELL_MAX_STEPS + 1, 3)
    assert lstm_kernel(short, needs_grad=False, segment_gradients=False) == "cell"
    assert lstm_kernel(short, needs_grad=False, segment_gradients=True) == "cell"
    assert lstm_kernel(long, needs_grad=False, segment_gradients=False) == "onednn"
    assert lstm_kernel(short, needs_grad=True, segment_gradients=False) == "onednn"
    assert lstm_kernel(long, needs_grad=True, segment_gradients=True) == "segment"


@pytest.mark.parametrize("layer_class", [WeightDropLSTM, VDLSTMLayer])
def test_layers_run_the_chosen_kernel_with_the_same_numbers(layer_class: type, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = WeightDropLSTM(5, 6) if layer_class is WeightDropLSTM else VDLSTMLayer(5, 6, 0.1)
    chosen = []
    original = fused_lstm.lstm_kernel
    monkeypatch.setattr(fused_lstm, "lstm_kernel", lambda *a: chosen.append(original(*a)) or chosen[-1])
    x = torch.randn(2, CELL_MAX_STEPS + 3, 5)
    layer.eval()
    with torch.no_grad():
        whole, _ = layer(x)
        state, pieces = None, []
        for t in range(x.size(1)):
            out, state = layer(x[:, t : t + 1], state)
            pieces.append(out)
    assert chosen == ["onednn"] + ["cell"] * x.size(1)
    assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-6)
    train_out, _ = layer.train()(x)
    layer.gradient_mode()
    segment_out, _ = layer(x)
    assert chosen[-2:] == ["onednn", "segment"]
    assert_close(segment_out, train_out, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(segment_out.square().sum(), list(layer.parameters()))
    expected = torch.autograd.grad(train_out.square().sum(), list(layer.parameters()))
    assert_close(grads, expected, rtol=1e-4, atol=1e-5)
