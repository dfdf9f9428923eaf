"""What every encoder returns, and the opaque state a stateful encoder carries across windows.

Nothing outside ``encoders/`` knows what a state holds. A stateful encoder (a
:class:`RecurrentStack`: AWD-LSTM, VD-LSTM, QRNN) returns a :class:`State` -- its
:class:`StackState` -- that can be detached from the graph (truncated BPTT), cut to a subset of
its streams, joined with the states of other streams, moved to a device and saved as plain
tensors; a stateless encoder (a Transformer reading blocks) returns ``None``. The helpers below
accept ``None`` everywhere, so callers never branch on the encoder family.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor, nn

from reglm.layers.component import Component
from reglm.layers.dropout import LockedDropout
from reglm.layers.inference import Frozen

S = TypeVar("S", bound="State")
LayerState = tuple[Tensor, ...]
"""The carried tensors of one layer of a recurrent stack."""
Device = torch.device | str | None


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
class StackState:
    """The carried tensors of every layer of a recurrent stack, as a tree: ``layers[l]`` is layer
    ``l``'s tuple of tensors (an LSTM's ``(h, c)``, each ``(1, B, H_l)``; a QRNN's ``(c, x_prev)``,
    ``(B, H_l)`` and ``(B, (k_l - 1) I_l)``), each with its ``B`` streams along ``stream_dim``.

    Every operation of :class:`State` is one map over the tensors of the tree, so a new recurrent
    layer declares only its tensors (:meth:`RecurrentStack.init_state`)."""

    layers: list[LayerState]
    stream_dim: int = 0

    def map(self, fn: Callable[[Tensor], Tensor]) -> StackState:
        """The same tree with ``fn`` applied to every tensor."""
        return StackState([tuple(fn(t) for t in layer) for layer in self.layers], self.stream_dim)

    def detach(self) -> StackState:
        return self.map(Tensor.detach)

    def select(self, streams: slice | Tensor) -> StackState:
        index = (slice(None),) * self.stream_dim + (streams,)
        return self.map(lambda t: t[index])

    def to(self, device: torch.device | str) -> StackState:
        return self.map(lambda t: t.to(device))

    def state_dict(self) -> list[list[Tensor]]:
        return [list(layer) for layer in self.layers]

    @classmethod
    def cat(cls, states: Sequence[StackState]) -> StackState:
        dim = states[0].stream_dim
        groups = zip(*(s.layers for s in states))
        return cls([tuple(torch.cat(parts, dim=dim) for parts in zip(*group)) for group in groups], dim)


class NarrowingStackSizes:
    """The sizes of a stack whose layers are ``hidden_size`` wide but the last, which is
    ``last_hidden_size`` or, when that is none, the input size (so a tied softmax reads it): a
    mixin of the configs of the AWD-LSTM and QRNN encoders, whose fields these are."""

    hidden_size: int
    last_hidden_size: int | None
    num_layers: int

    def output_size(self, input_size: int) -> int:
        """``H_L``: the input size, or ``last_hidden_size`` when set (AWD-LSTM section 4.5)."""
        return input_size if self.last_hidden_size is None else self.last_hidden_size

    def layer_sizes(self, input_size: int) -> list[int]:
        """``H_l`` of every layer, first to last."""
        return [self.hidden_size] * (self.num_layers - 1) + [self.output_size(input_size)]


class Encoder(Component):
    """The base every encoder derives from.

    An encoder has ``Config`` (its :class:`~reglm.config.fields.ComponentConfig` dataclass),
    ``from_config(cfg, input_size)``, ``output_size`` (``H``), ``layer_sizes`` (every layer's
    ``H_l``), ``init_state(B, device, dtype)`` and ``load_state(raw)`` (its opaque :class:`State`,
    or ``None`` when it is stateless), ``forward(x: (B, T, I), state) -> EncoderOutput`` and
    ``export_module(frozen) -> (module, state tensors)`` (:mod:`reglm.layers.inference`). Its
    optional parts (``skips_parameters``, ``gradient_mode``, the export refusal) are declared by
    :class:`~reglm.layers.component.Component`."""

    role = "encoder"
    output_size: int
    layer_sizes: list[int]

    def init_state(self, batch_size: int, device: Device = None, dtype: torch.dtype | None = None) -> State | None:
        raise NotImplementedError

    def load_state(self, raw: Any) -> State | None:
        raise NotImplementedError


class StackLayer(Component):
    """The base of a layer of a :class:`RecurrentStack` (what it must have is in that class's
    docstring); ``gradient_mode`` and ``export_module`` default as for a component."""

    role = "layer"
    hidden_size: int
    state_names: tuple[str, ...]


class RecurrentStack(Encoder):
    """The base of every stateful encoder: a stack of recurrent layers carrying a
    :class:`StackState` across windows.

    A layer is a module with ``hidden_size`` (``H_l``), ``init_state(B, device, dtype)`` (its zero
    state: a tuple of tensors with the streams along the stack's ``stream_dim``), ``state_names``
    (one short name per tensor, for the export's inputs and outputs),
    ``forward(x: (B, T, I), state or None) -> (out: (B, T, H_l), new state)`` and
    ``export_module(frozen)`` (its eval-mode computation as a plain module, see
    :meth:`RecurrentStack.export_module`), and derives from :class:`StackLayer` (which declares
    ``gradient_mode``: what dynamic evaluation switches on it). A subclass builds
    its layers, passes them to ``__init__``, sets ``stream_dim`` and defines :meth:`step`: what one
    layer does within the stack (the dropout between layers, for instance). ``init_state``,
    ``load_state`` and ``forward`` are shared.
    """

    stream_dim: int = 0
    """The axis of the streams in every layer's state tensors."""

    def __init__(self, layers: Sequence[StackLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.layer_sizes = [layer.hidden_size for layer in self.layers]
        self.output_size = self.layer_sizes[-1]

    def gradient_mode(self) -> None:
        """Every layer in its gradient mode."""
        for layer in self.layers:
            layer.gradient_mode()

    def init_state(self, batch_size: int, device: Device = None, dtype: torch.dtype | None = None) -> StackState:
        """The zero state of every layer, on the parameters' device/dtype by default."""
        zeros = [tuple(layer.init_state(batch_size, device, dtype)) for layer in self.layers]
        return StackState(zeros, self.stream_dim)

    def load_state(self, raw: Any) -> StackState:
        """A state from its ``state_dict()``; ``ValueError`` when it does not fit these layers
        (layer count, tensor count, shapes, or streams that differ between tensors)."""
        template = self.init_state(1, device="meta")
        if not isinstance(raw, (list, tuple)) or len(raw) != len(template.layers):
            raise ValueError(f"expected the state of {len(template.layers)} layers")
        layers = []
        streams = set()
        for li, (tensors, zeros) in enumerate(zip(raw, template.layers)):
            shapes = [_shape_text(z.shape, self.stream_dim) for z in zeros]
            fits = isinstance(tensors, (list, tuple)) and len(tensors) == len(zeros)
            fits = fits and all(isinstance(t, Tensor) and t.dim() == z.dim() for t, z in zip(tensors, zeros))
            if not fits or [_shape_text(t.shape, self.stream_dim) for t in tensors] != shapes:
                raise ValueError(f"expected layer {li}'s state as tensors of shapes {', '.join(shapes)}")
            streams.update(t.shape[self.stream_dim] for t in tensors)
            layers.append(tuple(tensors))
        if len(streams) > 1:
            raise ValueError("the layers' states have different numbers of streams")
        return StackState(layers, self.stream_dim)

    def step(self, li: int, x: Tensor, state: LayerState | None, emb: Tensor) -> tuple[Tensor, LayerState, Tensor]:
        """Layer ``l`` on ``x`` from ``state`` (None: zeros): its undropped output, its new state
        and the input of the next layer (for the last layer: the encoder's output). ``emb`` is the
        stack's input, whose dtype a mask drawn per call follows."""
        raise NotImplementedError

    def forward(self, emb: Tensor, state: StackState | None = None) -> EncoderOutput:
        """``emb: (B, T, E)`` (as the input layer left it), ``state`` as from :meth:`init_state`
        or a previous call, or None for zeros. Returns :class:`EncoderOutput`."""
        if state is not None and len(state.layers) != len(self.layers):
            raise ValueError(f"state has {len(state.layers)} layers, the encoder has {len(self.layers)}")
        x = emb
        layer_outputs: list[Tensor] = []
        new_state: list[LayerState] = []
        for li in range(len(self.layers)):
            raw, layer_state, x = self.step(li, x, None if state is None else state.layers[li], emb)
            layer_outputs.append(raw)
            new_state.append(layer_state)
        state = StackState(new_state, self.stream_dim)
        return EncoderOutput(output=x, raw_output=layer_outputs[-1], layer_outputs=layer_outputs, state=state)

    def export_module(self, frozen: Frozen) -> tuple[nn.Module, list[StateTensor]]:
        """The stack of its layers' export modules (:class:`StackExport`) and its state tensors:
        per layer, those of its zero state that hold anything (a QRNN layer of window 1 carries
        an empty ``x_prev``, which the export leaves out), named by the layer's ``state_names``.
        A layer's export module reads and returns exactly those tensors; every dropout is the
        identity at evaluation, so :meth:`step` has no part in it."""
        spec: list[StateTensor] = []
        counts: list[int] = []
        for li, layer in enumerate(self.layers):
            zeros = layer.init_state(1, device="meta")
            kept = [(name, zero.shape) for name, zero in zip(layer.state_names, zeros) if zero.numel()]
            spec += [StateTensor(f"{n}0_{li}", f"{n}n_{li}", _shape_spec(shape, self.stream_dim)) for n, shape in kept]
            counts.append(len(kept))
        return StackExport([layer.export_module(frozen) for layer in self.layers], counts), spec


class StackExport(nn.Module):
    """``forward(x, state) -> (output, layer outputs, new state)``: the layers' export modules in
    turn, layer ``l`` reading the next ``counts[l]`` tensors of the flat ``state``."""

    def __init__(self, layers: Sequence[nn.Module], counts: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.counts = list(counts)

    def forward(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        outputs: list[Tensor] = []
        new_state: list[Tensor] = []
        start = 0
        for li, layer in enumerate(self.layers):
            x, layer_state = layer(x, state[start : start + self.counts[li]])
            start += self.counts[li]
            outputs.append(x)
            new_state += layer_state
        return x, outputs, new_state


class StateTensor(NamedTuple):
    """One state tensor of an export: its name as an input and as an output of the graph, and its
    shape with ``"batch"`` for the streams' axis, e.g. ``("h0_0", "hn_0", (1, "batch", 8))``."""

    input: str
    output: str
    shape: tuple[int | str, ...]


class LockedDropoutStack(RecurrentStack):
    """A :class:`RecurrentStack` with locked dropout ``hidden_dropout`` on the output of every layer
    but the last (the next layer's input) and ``output_dropout`` on the last one's (AWD-LSTM 4.2)."""

    def __init__(self, layers: Sequence[nn.Module], hidden_dropout: float, output_dropout: float) -> None:
        super().__init__(layers)
        self.hidden_dropout = LockedDropout(hidden_dropout)
        self.output_dropout = LockedDropout(output_dropout)

    def step(self, li: int, x: Tensor, state: LayerState | None, emb: Tensor) -> tuple[Tensor, LayerState, Tensor]:
        raw, new_state = self.layers[li](x, state)
        dropout = self.hidden_dropout if li < len(self.layers) - 1 else self.output_dropout
        return raw, new_state, dropout(raw)


def zero_state(ref: Tensor, shapes: Sequence[tuple[int, ...]], device: Device, dtype: torch.dtype | None) -> LayerState:
    """Zero tensors of ``shapes`` on ``device`` and in ``dtype``, by default ``ref``'s (a layer's parameter)."""
    device = ref.device if device is None else device
    dtype = ref.dtype if dtype is None else dtype
    return tuple(torch.zeros(shape, device=device, dtype=dtype) for shape in shapes)


def _shape_spec(shape: Sequence[int], stream_dim: int) -> tuple[int | str, ...]:
    return tuple("batch" if i == stream_dim else n for i, n in enumerate(shape))


def _shape_text(shape: Sequence[int], stream_dim: int) -> str:
    """``shape`` with the streams' axis written ``B``: ``(1, B, 8)``."""
    return "(" + ", ".join("B" if i == stream_dim else str(n) for i, n in enumerate(shape)) + ")"
