"""The shared recurrent stack (``RecurrentStack``) and its tensor-tree state (``StackState``), for
every registered stateful encoder: tree maps against direct indexing, and ``load_state`` against
the shapes each layer declares."""

from __future__ import annotations

import pytest
import torch

from reglm.encoders import ENCODERS
from reglm.encoders.base import RecurrentStack, StackState, concat_states

STATEFUL = sorted(kind for kind, cls in ENCODERS.items() if issubclass(cls, RecurrentStack))


def _encoder(kind: str) -> RecurrentStack:
    cls = ENCODERS[kind]
    return cls.from_config(cls.Config(kind=kind, hidden_size=6, num_layers=3), 5).double().eval()


def test_every_recurrent_encoder_is_a_stack() -> None:
    assert STATEFUL == ["awd-lstm", "qrnn", "vd-lstm"]


@pytest.mark.parametrize("kind", STATEFUL)
def test_tree_maps_match_indexing_along_the_stream_axis(kind: str) -> None:
    enc = _encoder(kind)
    state = enc(torch.randn(4, 3, 5, dtype=torch.float64)).state
    dim = enc.stream_dim
    assert state.stream_dim == dim and all(t.shape[dim] == 4 for layer in state.layers for t in layer)
    picks = torch.tensor([3, 0, 0])
    for index in (slice(1, 3), picks):
        chosen = state.select(index)
        for layer, part in zip(state.layers, chosen.layers):
            assert all(torch.equal(p, t.index_select(dim, torch.arange(4)[index])) for t, p in zip(layer, part))
    joined = concat_states([state.select(slice(0, 1)), state.select(slice(1, 4))])
    assert all(torch.equal(a, b) for la, lb in zip(state.layers, joined.layers) for a, b in zip(la, lb))
    assert all(layer[0].requires_grad for layer in state.layers), "the first tensor of every layer is computed"
    assert not any(t.requires_grad for layer in state.detach().layers for t in layer)
    raw = state.detach().state_dict()
    assert isinstance(raw, list) and all(isinstance(layer, list) for layer in raw), "saved as plain lists of tensors"
    reloaded = enc.load_state(raw)
    assert isinstance(reloaded, StackState) and reloaded.stream_dim == dim
    assert all(torch.equal(a, b) for la, lb in zip(raw, reloaded.layers) for a, b in zip(la, lb))


@pytest.mark.parametrize("kind", STATEFUL)
def test_carried_state_continues_the_stream(kind: str) -> None:
    """Two windows with the carried state equal one window of both (eval mode, float64)."""
    enc = _encoder(kind)
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    whole = enc(x)
    first = enc(x[:, :2])
    second = enc(x[:, 2:], enc.load_state(first.state.detach().state_dict()))
    torch.testing.assert_close(torch.cat([first.output, second.output], dim=1), whole.output, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", STATEFUL)
def test_load_state_refuses_what_does_not_fit(kind: str) -> None:
    enc = _encoder(kind)
    raw = enc.init_state(2).state_dict()
    dim = enc.stream_dim
    other_streams = enc.init_state(3).state_dict()
    wrong_width = [[t.narrow(-1, 0, 1) if t.size(-1) else t.unsqueeze(-1) for t in layer] for layer in raw]
    for bad, message in (
        (raw[:2], "expected the state of 3 layers"),
        (None, "expected the state of 3 layers"),
        ([raw[0][:1], raw[1], raw[2]], "expected layer 0's state"),
        ([raw[0], ["not a tensor", raw[1][1]], raw[2]], "expected layer 1's state"),
        (wrong_width, "expected layer 0's state"),
        ([raw[0], other_streams[1], raw[2]], "different numbers of streams"),
    ):
        with pytest.raises(ValueError, match=message):
            enc.load_state(bad)
    assert enc.load_state(other_streams).layers[0][0].shape[dim] == 3
