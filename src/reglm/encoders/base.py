"""What every encoder returns, and the opaque state a stateful encoder carries across windows.

Nothing outside ``encoders/`` knows what a state holds. A stateful encoder (an LSTM stack)
returns a :class:`State` that can be detached from the graph (truncated BPTT), cut to a subset of
its streams, joined with the states of other streams, moved to a device and saved as plain
tensors; a stateless encoder (a Transformer reading blocks) returns ``None``. The helpers below
accept ``None`` everywhere, so callers never branch on the encoder family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

S = TypeVar("S", bound="State")


class State(Protocol):
    """The carried state of ``B`` streams."""

    def detach(self: S) -> S:
        """The state cut from the autograd graph."""

    def select(self: S, streams: slice | Tensor) -> S:
        """The state of ``streams``: a slice of the ``B`` streams, or a 1-D integer tensor of
        stream indices (which may repeat, reorder or leave out streams: a beam's fork and drop)."""

    def to(self: S, device: torch.device | str) -> S:
        """The state on ``device``."""

    def state_dict(self) -> Any:
        """Plain tensors and lists, for ``torch.save`` (read back by the encoder's ``load_state``)."""

    @classmethod
    def cat(cls: type[S], states: Sequence[S]) -> S:
        """The states of consecutive groups of streams joined along the stream axis."""


@dataclass
class EncoderOutput:
    """What an encoder returns; the output layer and the objective terms read from it.

    * ``output: (B, T, H)`` -- what the output layer reads (after the encoder's output dropout;
      what AR penalizes, AWD-LSTM 4.6);
    * ``raw_output: (B, T, H)`` -- the same before dropout (what TAR reads);
    * ``layer_outputs`` -- the undropped output ``(B, T, H_l)`` of every layer, first to last;
    * ``state`` -- the state to pass with the next window, or ``None`` for a stateless encoder.
    """

    output: Tensor
    raw_output: Tensor
    layer_outputs: list[Tensor]
    state: State | None


def detach_state(state: S | None) -> S | None:
    return None if state is None else state.detach()


def select_streams(state: S | None, streams: slice | Tensor) -> S | None:
    return None if state is None else state.select(streams)


def concat_states(states: Sequence[S | None]) -> S | None:
    """``states`` of consecutive stream groups joined; ``None`` when the encoder is stateless."""
    if not states or states[0] is None:
        return None
    return type(states[0]).cat(states)


def state_to(state: S | None, device: torch.device | str) -> S | None:
    return None if state is None else state.to(device)


def state_dict_of(state: State | None) -> Any:
    return None if state is None else state.state_dict()


@dataclass
class LSTMStackState:
    """The ``(h, c)`` of every layer of an LSTM stack, each ``(1, B, H_l)`` (the fused kernel's layout)."""

    layers: list[tuple[Tensor, Tensor]]

    def detach(self) -> LSTMStackState:
        return LSTMStackState([(h.detach(), c.detach()) for h, c in self.layers])

    def select(self, streams: slice | Tensor) -> LSTMStackState:
        return LSTMStackState([(h[:, streams], c[:, streams]) for h, c in self.layers])

    def to(self, device: torch.device | str) -> LSTMStackState:
        return LSTMStackState([(h.to(device), c.to(device)) for h, c in self.layers])

    def state_dict(self) -> list[list[Tensor]]:
        return [[h, c] for h, c in self.layers]

    @classmethod
    def cat(cls, states: Sequence[LSTMStackState]) -> LSTMStackState:
        return cls([(torch.cat([h for h, _ in layer], dim=1), torch.cat([c for _, c in layer], dim=1)) for layer in zip(*(s.layers for s in states))])

    @classmethod
    def from_state_dict(cls, raw: Any, sizes: Sequence[int]) -> LSTMStackState:
        """Rebuild a :meth:`state_dict` for layers of ``sizes`` units; ``ValueError`` if it does not fit."""
        if not isinstance(raw, (list, tuple)) or len(raw) != len(sizes):
            raise ValueError(f"expected the state of {len(sizes)} LSTM layers")
        layers = []
        batch = None
        for pair, size in zip(raw, sizes):
            h, c = pair
            if not (isinstance(h, Tensor) and isinstance(c, Tensor)) or h.dim() != 3 or h.shape != c.shape or h.shape[0] != 1 or h.shape[2] != size:
                raise ValueError(f"expected (h, c) of shape (1, B, {size})")
            if batch is not None and h.shape[1] != batch:
                raise ValueError("the layers' states have different numbers of streams")
            batch = h.shape[1]
            layers.append((h, c))
        return cls(layers)
