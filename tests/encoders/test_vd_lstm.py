"""VD-LSTM layer and encoder (Inan et al., 2017, section 6.1 and appendix A): tied variational dropout."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from reglm.encoders import vd_lstm
from reglm.encoders.base import EncoderOutput, StackState
from reglm.encoders.vd_lstm import VDLSTMEncoder, VDLSTMLayer
from reglm.layers.dropout import keep_mask

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
F64 = torch.float64


# ----------------------------------------------------------------------------- slow references


def _reference_layer(x, w_ih, w_hh, b_ih, b_hh, h, c, mask=None):
    """Explicit per-step LSTM cell (gate order i, f, g, o); ``mask`` multiplies ``h_{t-1}`` in the
    recurrent product only. ``x: (B, T, I)``, ``h, c, mask: (B, H)``. Returns unmasked
    ``(B, T, H)`` outputs and the final ``(h, c)``."""
    hs = w_hh.size(1)
    outs = []
    for t in range(x.size(1)):
        h_rec = h if mask is None else mask * h
        z = x[:, t] @ w_ih.T + b_ih + h_rec @ w_hh.T + b_hh
        i = torch.sigmoid(z[:, 0 * hs : 1 * hs])
        f = torch.sigmoid(z[:, 1 * hs : 2 * hs])
        g = torch.tanh(z[:, 2 * hs : 3 * hs])
        o = torch.sigmoid(z[:, 3 * hs : 4 * hs])
        c = f * c + i * g
        h = o * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1), h, c


def _layer_ref(layer: VDLSTMLayer, x, h, c, mask=None):
    return _reference_layer(x, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0, h, c, mask)


def _reference_encoder(enc: VDLSTMEncoder, emb, masks, state=None):
    """The whole stack by hand: layer ``l`` uses ``masks[l]`` on its own ``h_{t-1}`` and the next
    layer (or the output) reads ``masks[l] * h_t``. Returns ``(output, raw outputs, states)``."""
    x = emb
    raws, states = [], []
    for li, layer in enumerate(enc.layers):
        if state is None:
            h0 = torch.zeros(emb.size(0), layer.hidden_size, dtype=emb.dtype)
            c0 = torch.zeros_like(h0)
        else:
            h0, c0 = state.layers[li][0][0], state.layers[li][1][0]
        raw, h, c = _layer_ref(layer, x, h0, c0, masks[li])
        raws.append(raw)
        states.append((h, c))
        x = raw if masks[li] is None else masks[li][:, None, :] * raw
    return x, raws, states


# ----------------------------------------------------------------------------- helpers


def _layer(input_size: int = 3, hidden_size: int = 4, init_range: float = 0.5) -> VDLSTMLayer:
    return VDLSTMLayer(input_size, hidden_size, init_range).to(F64)


def _encoder(p: float = 0.5, emb: int = 3, hidden: int = 4, layers: int = 2) -> VDLSTMEncoder:
    return VDLSTMEncoder(emb, hidden, layers, p, init_range=0.5).to(F64)


def _grads(loss: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(tensors)))


def _loss(out: torch.Tensor, h: torch.Tensor, c: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A loss that reaches every output and the final state with distinct weights."""
    return (out * weight).sum() + (h * 0.7).pow(2).sum() + (c * 1.3).sin().sum()


def _mask(b: int, h: int, p: float = 0.5) -> torch.Tensor:
    """A fixed keep mask with zeros and ``1 / (1 - p)`` entries."""
    return keep_mask((b, h), p, torch.empty(0, dtype=F64))


def _fake_keep_mask(masks: list[torch.Tensor], calls: list) -> Callable:
    """Stand-in for ``keep_mask`` that returns ``masks`` in order and records its arguments."""
    queue = list(masks)

    def fake(shape, p, like):
        calls.append((tuple(shape), p, like.dtype))
        return queue.pop(0)

    return fake


def _spy_keep_mask(calls: list) -> Callable:
    """``keep_mask`` itself, recording what it returns."""

    def spy(shape, p, like):
        m = keep_mask(shape, p, like)
        calls.append(m)
        return m

    return spy


# ----------------------------------------------------------------------------- construction


def test_parameters_like_nn_lstm_and_init_range() -> None:
    layer = VDLSTMLayer(5, 7, init_range=0.05)
    ref = torch.nn.LSTM(5, 7, batch_first=True)
    assert {k: v.shape for k, v in layer.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(layer.state_dict(), strict=True)
    for param in layer.parameters():
        assert param.abs().max() <= 0.05 and param.abs().max() > 0.025  # U(-r, r), not nn.LSTM's 1/sqrt(7)
    enc = VDLSTMEncoder(6, 7, 3, 0.4, 0.1)
    assert [(li.input_size, li.hidden_size) for li in enc.layers] == [(6, 7), (7, 7), (7, 7)]
    assert enc.output_size == 7 and enc.dropout == 0.4
    state = enc.init_state(2)
    assert len(state.layers) == 3 and all(h.shape == (1, 2, 7) and c.shape == (1, 2, 7) for h, c in state.layers)
    assert all(not h.any() and not c.any() for h, c in state.layers)


@pytest.mark.parametrize(
    "args",
    [
        (3, 4, 2, 1.0, 0.1),
        (3, 4, 2, -0.1, 0.1),
        (3, 4, 0, 0.5, 0.1),
        (0, 4, 2, 0.5, 0.1),
        (3, 0, 2, 0.5, 0.1),
        (3, 4, 2, 0.5, 0.0),
        (3, 4, 2, 0.5, -1.0),
    ],
)
def test_invalid_arguments(args) -> None:
    with pytest.raises(ValueError):
        VDLSTMEncoder(*args)


def test_invalid_layer_arguments_and_mask_shape() -> None:
    with pytest.raises(ValueError):
        VDLSTMLayer(3, 4, 0.0)
    with pytest.raises(ValueError):
        VDLSTMLayer(0, 4, 0.1)
    layer = _layer()
    with pytest.raises(ValueError):
        layer(torch.randn(2, 3, 3, dtype=F64), mask=torch.ones(2, 5, dtype=F64))
    with pytest.raises(ValueError):
        _encoder()(torch.randn(2, 3, 3, dtype=F64), state=StackState(_encoder().init_state(2).layers[:1], stream_dim=1))


# ----------------------------------------------------------------------------- mask=None: nn.LSTM


@pytest.mark.parametrize("with_state", [False, True])
def test_layer_without_mask_equals_nn_lstm(with_state: bool) -> None:
    layer = _layer()
    ref = torch.nn.LSTM(3, 4, batch_first=True).to(F64)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 3, dtype=F64)
    state = (torch.randn(1, 2, 4, dtype=F64), torch.randn(1, 2, 4, dtype=F64)) if with_state else None
    outs = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_()
        si = tuple(s.clone().requires_grad_() for s in state) if state else None
        out, (h, c) = module(xi, si)
        weight = torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)
        inputs = [xi, *module.parameters(), *(si or ())]
        outs.append((out, h, c, _grads(_loss(out, h, c, weight), inputs)))
    (out, h, c, g), (out_r, h_r, c_r, g_r) = outs
    assert h.shape == (1, 2, 4) and out.shape == (2, 6, 4)
    torch.testing.assert_close(out, out_r, **TIGHT)
    torch.testing.assert_close(h, h_r, **TIGHT)
    torch.testing.assert_close(c, c_r, **TIGHT)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, **TIGHT)


def _nn_lstm_copy(enc: VDLSTMEncoder) -> torch.nn.LSTM:
    ref = torch.nn.LSTM(enc.layers[0].input_size, enc.output_size, len(enc.layers), batch_first=True).to(F64)
    ref.load_state_dict(
        {f"{name[:-1]}{li}": p for li, layer in enumerate(enc.layers) for name, p in layer.state_dict().items()},
        strict=True,
    )
    return ref


@pytest.mark.parametrize("mode", ["eval", "train_p0"])
def test_encoder_without_dropout_equals_two_layer_nn_lstm(mode: str) -> None:
    enc = _encoder(p=0.0 if mode == "train_p0" else 0.6)
    enc.train(mode == "train_p0")
    ref = _nn_lstm_copy(enc)
    x = torch.randn(2, 5, 3, dtype=F64)
    layers = [(torch.randn(1, 2, 4, dtype=F64), torch.randn(1, 2, 4, dtype=F64)) for _ in range(2)]
    state = StackState(layers, stream_dim=1)
    res = enc(x, state)
    out_r, (h_r, c_r) = ref(x, (torch.cat([s[0] for s in state.layers]), torch.cat([s[1] for s in state.layers])))
    assert isinstance(res, EncoderOutput)
    torch.testing.assert_close(res.output, out_r, **TIGHT)
    assert res.raw_output is res.layer_outputs[-1]
    torch.testing.assert_close(res.raw_output, out_r, **TIGHT)
    torch.testing.assert_close(torch.cat([s[0] for s in res.state.layers]), h_r, **TIGHT)
    torch.testing.assert_close(torch.cat([s[1] for s in res.state.layers]), c_r, **TIGHT)


# ----------------------------------------------------------------------------- mask given: slow reference


@pytest.mark.parametrize("with_state", [False, True])
def test_layer_with_mask_equals_reference(with_state: bool) -> None:
    layer = _layer()
    x = torch.randn(3, 7, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(3, 4, dtype=F64, requires_grad=True) if with_state else torch.zeros(3, 4, dtype=F64)
    c0 = torch.randn(3, 4, dtype=F64, requires_grad=True) if with_state else torch.zeros(3, 4, dtype=F64)
    mask = _mask(3, 4, p=0.4)
    assert (mask == 0).any() and (mask != 0).any()
    weight = torch.randn(3, 7, 4, dtype=F64)
    inputs = [x, *layer.parameters(), *((h0, c0) if with_state else ())]

    out, (h, c) = layer(x, (h0[None], c0[None]) if with_state else None, mask)
    g = _grads(_loss(out, h, c, weight), inputs)
    out_r, h_r, c_r = _layer_ref(layer, x, h0, c0, mask)
    g_r = _grads(_loss(out_r, h_r, c_r, weight), inputs)

    assert out.shape == (3, 7, 4) and h.shape == (1, 3, 4) and c.shape == (1, 3, 4)
    torch.testing.assert_close(out, out_r, **TIGHT)
    torch.testing.assert_close(h[0], h_r, **TIGHT)
    torch.testing.assert_close(c[0], c_r, **TIGHT)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, **TIGHT)
    # The mask changes the result (it is really applied) but is not applied to the outputs.
    out_nomask, _ = layer(x, (h0[None], c0[None]) if with_state else None)
    assert not torch.allclose(out, out_nomask)
    assert (out[:, 1:] != 0).all()


def test_all_ones_mask_equals_no_mask() -> None:
    layer = _layer()
    x = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    state = (torch.randn(1, 2, 4, dtype=F64), torch.randn(1, 2, 4, dtype=F64))
    weight = torch.randn(2, 6, 4, dtype=F64)
    results = []
    for mask in (torch.ones(2, 4, dtype=F64), None):
        out, (h, c) = layer(x, state, mask)
        results.append((out, h, c, _grads(_loss(out, h, c, weight), [x, *layer.parameters()])))
    (out, h, c, g), (out_r, h_r, c_r, g_r) = results
    torch.testing.assert_close(out, out_r, **TIGHT)
    torch.testing.assert_close(h, h_r, **TIGHT)
    torch.testing.assert_close(c, c_r, **TIGHT)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, **TIGHT)


# ----------------------------------------------------------------------------- the encoder's tied masks


def test_encoder_ties_each_mask_to_recurrence_and_next_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """With known masks the whole 2-layer forward (and backward) equals the hand-written stack in
    which ``m_l`` multiplies both ``h^l_{t-1}`` in layer ``l`` and the input ``h^l_t`` of layer ``l+1``."""
    enc = _encoder(p=0.5).train()
    masks = [_mask(3, 4), _mask(3, 4)]
    calls: list = []
    monkeypatch.setattr(vd_lstm, "keep_mask", _fake_keep_mask(masks, calls))
    emb = torch.randn(3, 6, 3, dtype=F64, requires_grad=True)
    layers = [(torch.randn(1, 3, 4, dtype=F64), torch.randn(1, 3, 4, dtype=F64)) for _ in range(2)]
    state = StackState(layers, stream_dim=1)
    res = enc(emb, state)

    assert calls == [((3, 4), 0.5, F64), ((3, 4), 0.5, F64)]  # one (B, H) mask per layer, one p
    out_r, raws_r, states_r = _reference_encoder(enc, emb, masks, state)
    torch.testing.assert_close(res.output, out_r, **TIGHT)
    torch.testing.assert_close(res.output, masks[1][:, None, :] * res.raw_output, **TIGHT)
    for raw, raw_r in zip(res.layer_outputs, raws_r):
        torch.testing.assert_close(raw, raw_r, **TIGHT)
    for (h, c), (h_r, c_r) in zip(res.state.layers, states_r):
        torch.testing.assert_close(h[0], h_r, **TIGHT)
        torch.testing.assert_close(c[0], c_r, **TIGHT)
    weight = torch.randn(3, 6, 4, dtype=F64)
    inputs = [emb, *enc.parameters()]
    g = _grads((res.output * weight).sum() + res.state.layers[0][1].sum(), inputs)
    g_r = _grads((out_r * weight).sum() + states_r[0][1].sum(), inputs)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, **TIGHT)


def test_sampled_masks_are_shared_over_time_and_tied(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real sampler: the output is ``m_L * raw_L`` with one ``(B, 1, H)`` mask (the same
    features dropped at every step of a stream), and the recorded masks reproduce the stack."""
    p = 0.5
    enc = _encoder(p=p, hidden=6).train()
    calls: list = []
    monkeypatch.setattr(vd_lstm, "keep_mask", _spy_keep_mask(calls))
    emb = torch.randn(4, 8, 3, dtype=F64)
    res = enc(emb)
    assert len(calls) == 2
    ratio = res.output / res.raw_output  # raw outputs are never exactly 0
    assert torch.equal(ratio, ratio[:, :1].expand_as(ratio))  # constant over time, per stream/feature
    assert set(ratio.unique().tolist()) <= {0.0, 1.0 / (1.0 - p)}
    assert (ratio == 0).any() and (ratio != 0).any()
    out_r, raws_r, _ = _reference_encoder(enc, emb, calls)
    torch.testing.assert_close(res.output, out_r, **TIGHT)
    torch.testing.assert_close(res.layer_outputs[0], raws_r[0], **TIGHT)


def test_streams_get_different_masks_with_keep_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    p = 0.3
    enc = VDLSTMEncoder(3, 50, 2, p, 0.1).train()
    calls: list = []
    monkeypatch.setattr(vd_lstm, "keep_mask", _spy_keep_mask(calls))
    emb = torch.randn(64, 2, 3)
    res = enc(emb)
    enc(emb)
    first, second, third, _ = calls
    for m in (first, second):
        assert m.shape == (64, 50)
        kept = (m != 0).double()
        assert abs(kept.mean().item() - (1 - p)) < 0.03  # 3200 draws: sd ~ 0.008
        assert len({tuple(row.tolist()) for row in kept}) == 64  # every stream has its own mask
        torch.testing.assert_close(m[m != 0], torch.full_like(m[m != 0], 1 / (1 - p)))
    assert not torch.equal(first, second)  # layers have independent masks
    assert not torch.equal(first, third)  # and a new mask per forward call
    dropped = (res.output == 0).all(dim=1).double()  # (B, H): dropped for the whole sequence
    assert abs(dropped.mean().item() - p) < 0.03
    assert ((res.output == 0).any(dim=1) == (res.output == 0).all(dim=1)).all()


# ----------------------------------------------------------------------------- modes


def test_eval_is_deterministic_and_ignores_p(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _encoder(p=0.6).eval()
    other = _encoder(p=0.0).eval()
    other.load_state_dict(enc.state_dict())
    emb = torch.randn(2, 5, 3, dtype=F64)

    def forbidden(*args):
        raise AssertionError("keep_mask must not be called")

    monkeypatch.setattr(vd_lstm, "keep_mask", forbidden)
    a, b, c = enc(emb), enc(emb), other(emb)
    assert torch.equal(a.output, b.output) and torch.equal(a.output, c.output)
    assert torch.equal(a.output, a.raw_output)


def test_training_p0_equals_eval(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _encoder(p=0.0)
    emb = torch.randn(2, 5, 3, dtype=F64)
    expected = enc.eval()(emb)

    def forbidden(*args):
        raise AssertionError("keep_mask must not be called")

    monkeypatch.setattr(vd_lstm, "keep_mask", forbidden)
    got = enc.train()(emb)
    torch.testing.assert_close(got.output, expected.output, **TIGHT)
    for (h, c), (h_e, c_e) in zip(got.state.layers, expected.state.layers):
        torch.testing.assert_close(h, h_e, **TIGHT)
        torch.testing.assert_close(c, c_e, **TIGHT)


def test_training_with_dropout_differs_from_eval() -> None:
    enc = _encoder(p=0.5)
    emb = torch.randn(2, 5, 3, dtype=F64)
    assert not torch.allclose(enc.train()(emb).raw_output, enc.eval()(emb).raw_output)


# ----------------------------------------------------------------------------- carried state


@pytest.mark.parametrize("masked", [False, True])
def test_layer_state_carries_across_calls(masked: bool) -> None:
    layer = _layer()
    x = torch.randn(2, 10, 3, dtype=F64)
    state = (torch.randn(1, 2, 4, dtype=F64), torch.randn(1, 2, 4, dtype=F64))
    mask = _mask(2, 4) if masked else None
    out, (h, c) = layer(x, state, mask)
    out_a, state_a = layer(x[:, :5], state, mask)
    out_b, (h_b, c_b) = layer(x[:, 5:], state_a, mask)
    torch.testing.assert_close(out, torch.cat([out_a, out_b], dim=1), **TIGHT)
    torch.testing.assert_close(h, h_b, **TIGHT)
    torch.testing.assert_close(c, c_b, **TIGHT)


@pytest.mark.parametrize("masked", [False, True])
def test_encoder_state_carries_across_calls(masked: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = _encoder(p=0.5).train(masked)
    masks = [_mask(2, 4), _mask(2, 4)]
    calls: list = []
    monkeypatch.setattr(vd_lstm, "keep_mask", _fake_keep_mask(masks * 3, calls))
    emb = torch.randn(2, 10, 3, dtype=F64)
    full = enc(emb)
    first = enc(emb[:, :5])
    second = enc(emb[:, 5:], first.state)
    assert len(calls) == (6 if masked else 0)
    torch.testing.assert_close(full.output, torch.cat([first.output, second.output], dim=1), **TIGHT)
    for (h, c), (h_b, c_b) in zip(full.state.layers, second.state.layers):
        torch.testing.assert_close(h, h_b, **TIGHT)
        torch.testing.assert_close(c, c_b, **TIGHT)
