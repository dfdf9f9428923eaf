"""Weight-dropped LSTM (AWD-LSTM section 2) and the AWD-LSTM encoder stack (sections 4.2, 4.5, 5)."""

from __future__ import annotations

import math

import pytest
import torch

from reglm.config import ModelConfig
from reglm.encoders.awd_lstm import AWDLSTMEncoder, WeightDropLSTM
from reglm.encoders.base import StackState, detach_state
from reglm.layers.dropout import keep_mask

TIGHT = {"rtol": 1e-6, "atol": 1e-7}


def _pair(input_size: int = 5, hidden_size: int = 7, p: float = 0.0) -> tuple[WeightDropLSTM, torch.nn.LSTM]:
    ours = WeightDropLSTM(input_size, hidden_size, weight_dropout=p)
    ref = torch.nn.LSTM(input_size, hidden_size, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _reference_lstm(x: torch.Tensor, w_ih, w_hh, b_ih, b_hh, h, c) -> torch.Tensor:
    """Step-by-step LSTM (gate order i, f, g, o) with fixed matrices; x: (B, T, I), h, c: (B, H)."""
    outs = []
    for t in range(x.size(1)):
        gates = x[:, t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1)


def test_parameter_names_and_shapes_match_nn_lstm() -> None:
    ours = WeightDropLSTM(5, 7, weight_dropout=0.5)
    ref = torch.nn.LSTM(5, 7, batch_first=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.weight_ih_l0.shape == (28, 5) and ours.weight_hh_l0.shape == (28, 7)
    # State dicts interchange in both directions, strictly.
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(ref.state_dict(), strict=True)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_equals_nn_lstm_without_weight_drop(train: bool, with_state: bool) -> None:
    ours, ref = _pair()
    ours.train(train)
    ref.train(train)
    x = torch.randn(3, 9, 5)
    x_ours = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    state = (torch.randn(1, 3, 7), torch.randn(1, 3, 7)) if with_state else None
    s_ours = tuple(s.clone().requires_grad_() for s in state) if state else None
    s_ref = tuple(s.clone().requires_grad_() for s in state) if state else None

    out, (h, c) = ours(x_ours, s_ours)
    out_r, (h_r, c_r) = ref(x_ref, s_ref)
    torch.testing.assert_close(out, out_r, **TIGHT)
    torch.testing.assert_close(h, h_r, **TIGHT)
    torch.testing.assert_close(c, c_r, **TIGHT)

    g = torch.randn_like(out)
    (out * g).sum().add(h.sum() + 2 * c.sum()).backward()
    (out_r * g).sum().add(h_r.sum() + 2 * c_r.sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TIGHT)
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, getattr(ref, name).grad, **TIGHT)
    if state:
        for a, b in zip(s_ours, s_ref):
            torch.testing.assert_close(a.grad, b.grad, **TIGHT)


def test_weight_drop_is_identity_in_eval_mode() -> None:
    ours, ref = _pair(p=0.5)
    ours.eval()
    x = torch.randn(2, 6, 5)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TIGHT)


def test_weight_drop_gradient_reaches_raw_weight_and_is_zero_where_dropped() -> None:
    p = 0.5
    layer = WeightDropLSTM(5, 7, weight_dropout=p).train()
    x = torch.randn(3, 8, 5)
    torch.manual_seed(123)
    out, _ = layer(x)
    out.pow(2).sum().backward()
    torch.manual_seed(123)
    kept = keep_mask(layer.weight_hh_l0.shape, p, layer.weight_hh_l0) != 0
    grad = layer.weight_hh_l0.grad
    assert grad is not None
    assert (~kept).sum() > 10 and kept.sum() > 10
    assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept]))
    assert (grad[kept] != 0).float().mean() > 0.9
    # The raw parameter itself is untouched by the forward pass.
    assert (layer.weight_hh_l0 != 0).all()


def test_weight_drop_uses_one_mask_for_every_time_step() -> None:
    p = 0.5
    layer = WeightDropLSTM(4, 6, weight_dropout=p).train()
    x = torch.randn(2, 12, 4)
    h0, c0 = torch.randn(1, 2, 6), torch.randn(1, 2, 6)
    torch.manual_seed(7)
    out, (h, c) = layer(x, (h0, c0))
    torch.manual_seed(7)
    dropped = layer.weight_hh_l0.detach() * keep_mask(layer.weight_hh_l0.shape, p, layer.weight_hh_l0)
    with torch.no_grad():
        expected = _reference_lstm(x, layer.weight_ih_l0, dropped, layer.bias_ih_l0, layer.bias_hh_l0, h0[0], c0[0])
        undropped = _reference_lstm(
            x, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0, h0[0], c0[0]
        )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h[0], expected[:, -1], rtol=1e-5, atol=1e-6)
    assert (out - undropped).abs().max() > 1e-3


def test_weight_drop_resamples_per_forward() -> None:
    layer = WeightDropLSTM(4, 6, weight_dropout=0.5).train()
    x = torch.randn(2, 5, 4)
    assert not torch.allclose(layer(x)[0], layer(x)[0])


def test_weight_drop_rejects_bad_probability() -> None:
    with pytest.raises(ValueError):
        WeightDropLSTM(3, 3, weight_dropout=1.0)


def _encoder(**kw) -> AWDLSTMEncoder:
    base = dict(
        emb_size=6,
        hidden_size=10,
        num_layers=3,
        input_dropout=0.0,
        hidden_dropout=0.0,
        output_dropout=0.0,
        weight_dropout=0.0,
    )
    base.update(kw)
    cfg = ModelConfig.build(**base)
    return AWDLSTMEncoder(cfg.encoder, cfg.input.emb_size)


def test_encoder_layer_sizes() -> None:
    enc = _encoder()
    shapes = [(li.weight_ih_l0.shape, li.weight_hh_l0.shape) for li in enc.layers]
    assert shapes == [
        ((40, 6), (40, 10)),  # first: reads emb_size
        ((40, 10), (40, 10)),
        ((24, 10), (24, 6)),  # last: hidden size emb_size (AWD-LSTM 4.5)
    ]
    single = _encoder(num_layers=1)
    assert single.layers[0].weight_ih_l0.shape == (24, 6) and single.layers[0].weight_hh_l0.shape == (24, 6)


def test_encoder_init_uses_each_layer_hidden_size() -> None:
    enc = _encoder(emb_size=16, hidden_size=64, num_layers=2)
    for layer, hidden in zip(enc.layers, (64, 16)):
        bound = 1 / math.sqrt(hidden)
        for param in layer.parameters():
            assert param.abs().max() <= bound
            assert param.abs().max() > 0.9 * bound


def test_encoder_output_fields_and_state() -> None:
    enc = _encoder().eval()
    emb = torch.randn(4, 7, 6)
    out = enc(emb)
    assert out.output.shape == (4, 7, 6) and out.raw_output.shape == (4, 7, 6)
    assert [o.shape for o in out.layer_outputs] == [(4, 7, 10), (4, 7, 10), (4, 7, 6)]
    assert out.raw_output is out.layer_outputs[-1]
    assert [tuple(h.shape) for h, _ in out.state.layers] == [(1, 4, 10), (1, 4, 10), (1, 4, 6)]
    for (h, _), layer_out in zip(out.state.layers, out.layer_outputs):
        torch.testing.assert_close(h[0], layer_out[:, -1])
    torch.testing.assert_close(out.output, out.raw_output, rtol=0, atol=0)
    zeros = enc.init_state(4)
    assert all(torch.equal(h, torch.zeros_like(h)) and torch.equal(c, torch.zeros_like(c)) for h, c in zeros.layers)
    torch.testing.assert_close(enc(emb, zeros).output, out.output, rtol=0, atol=0)
    with pytest.raises(ValueError):
        enc(emb, StackState(zeros.layers[:2], stream_dim=1))


def test_encoder_applies_locked_dropout_between_layers_and_on_output() -> None:
    p_hidden, p_out = 0.5, 0.25
    enc = _encoder(num_layers=2, hidden_dropout=p_hidden, output_dropout=p_out).train()
    seen = []
    enc.layers[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    out = enc(torch.randn(5, 8, 6))
    raw0, x1 = out.layer_outputs[0], seen[0]
    for got, raw, p in ((x1, raw0, p_hidden), (out.output, out.raw_output, p_out)):
        mask = (got != 0).float()
        assert 0 < mask.mean() < 1
        torch.testing.assert_close(mask, mask[:, :1].expand_as(mask), rtol=0, atol=0)  # locked over time
        torch.testing.assert_close(got, raw * mask / (1 - p), rtol=1e-6, atol=1e-7)


def test_state_carried_across_chunks_equals_one_long_pass() -> None:
    enc = _encoder().eval()
    emb = torch.randn(3, 10, 6)
    full = enc(emb)
    first = enc(emb[:, :4])
    second = enc(emb[:, 4:], detach_state(first.state))
    torch.testing.assert_close(torch.cat([first.output, second.output], dim=1), full.output, rtol=1e-5, atol=1e-6)
    for (h, c), (hf, cf) in zip(second.state.layers, full.state.layers):
        torch.testing.assert_close(h, hf, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, cf, rtol=1e-5, atol=1e-6)


def test_detach_state_cuts_the_graph() -> None:
    enc = _encoder(num_layers=2)
    emb = torch.randn(2, 4, 6, requires_grad=True)
    first = enc(emb)
    assert all(h.grad_fn is not None for h, _ in first.state.layers)
    carried = detach_state(first.state)
    for (h, c), (h0, c0) in zip(carried.layers, first.state.layers):
        assert not h.requires_grad and not c.requires_grad
        assert torch.equal(h, h0) and torch.equal(c, c0)
    second = enc(torch.randn(2, 4, 6), carried)
    second.output.sum().backward()
    assert emb.grad is None
    assert enc.layers[0].weight_hh_l0.grad is not None
