"""TorchScript export of an :class:`~reglm.export.modules.InferenceLM` (``torch.jit.script``).

The saved module (``torch.jit.load("model.pt")``, no reglm needed) has one method::

    forward(tokens: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]

``tokens: (B, T) int64``; ``state``: ``[h0_0, c0_0, h0_1, c0_1, ...]``, each ``(1, B, H_l)``
float32 zeros at the start of a stream (``[]`` for a Transformer); it returns the natural-log
``log_probs: (B, T, V)`` and the state to pass with the next chunk. TorchScript is deprecated
in torch 2.9+ (in favour of ``torch.export``) but works in 2.13; its deprecation warnings are
silenced here.

int8 is PyTorch's dynamic quantization of the inference module's ``nn.LSTM``, ``nn.Linear`` and
``nn.Embedding`` layers (:func:`reglm.export.quantize.quantize_module`), scripted the same way.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

FILE = "model.pt"


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated.*", category=DeprecationWarning)
        yield


def export_bytes(module: nn.Module) -> bytes:
    """``module`` scripted and saved."""
    buffer = io.BytesIO()
    with _quiet():
        torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def load(model: bytes) -> torch.jit.ScriptModule:
    with _quiet():
        return torch.jit.load(io.BytesIO(model), map_location="cpu")


def runner(model: bytes) -> Callable[[Tensor, list[Tensor]], tuple[Tensor, list[Tensor]]]:
    """``step(tokens, state) -> (log_probs, state)`` of the saved module."""
    module = load(model)

    def step(tokens: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        with torch.no_grad():
            return module(tokens, state)

    return step


QUANTIZED_LAYERS = ("LSTM", "Linear", "Embedding")


def quantized_ops(model: bytes) -> list[str]:
    """The quantized layer types in the saved module, sorted (e.g.
    ``torch.ao.nn.quantized.dynamic.modules.rnn.LSTM``)."""
    types = {m._c._type().qualified_name().removeprefix("__torch__.") for m in load(model).modules()}
    return sorted(t for t in types if ".quantized." in t and t.rsplit(".", 1)[1] in QUANTIZED_LAYERS)
