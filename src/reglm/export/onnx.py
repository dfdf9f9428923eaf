"""ONNX export of an :class:`~reglm.export.modules.InferenceLM`, and its runner in ONNX Runtime.

The exporter is PyTorch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``) at
opset :data:`OPSET`. The default exporter of torch >= 2.9 (``dynamo=True``, built on
``torch.export``) needs the ``onnxscript`` package, exports far more slowly (docs/deployment.md)
and specializes dimensions of size 1 away, so
that a model exported from a batch of one stream refuses two; the TorchScript-based exporter is
deprecated in torch 2.9+ but present and working in 2.13, needs only ``onnx``, and writes a
native ``LSTM`` op whose batch and time dimensions stay dynamic. Its deprecation warnings, its
warning about LSTM batch sizes (the initial states are explicit inputs here) and the tracer's
warnings about ``nn.LSTM``'s shape checks are silenced.

The graph (names as in ``export.json``; ``H_l`` the units of LSTM layer ``l``):

* inputs: ``tokens: (batch, time) int64``, then the encoder's state tensors (float32): for every
  LSTM layer ``h0_l, c0_l: (1, batch, H_l)``; for every QRNN layer ``c0_l: (batch, H_l)``, and
  ``x0_0: (batch, I)`` when the first layer's window is 2; none for a Transformer;
* outputs: ``log_probs: (batch, time, V) float32`` (natural log), then the new state under the
  same names with ``n`` for ``0`` (``hn_l, cn_l``...), to feed back with the next chunk.

The QRNN's fo-pooling is a scripted loop over time, which the exporter writes as an ONNX
``Loop``, so the graph reads any number of steps.

int8 (:func:`quantize`) is ONNX Runtime's dynamic quantization of the exported graph:
``LSTM`` -> ``DynamicQuantizeLSTM``, ``MatMul`` -> ``MatMulInteger`` (activations quantized per call),
embedding ``Gather`` -> an int8 table with ``DequantizeLinear``; weights are signed int8.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

from reglm.errors import ReglmError
from reglm.export.modules import InferenceLM

OPSET = 17
"""ONNX opset of the exported graph (17: the first with a native ``LayerNormalization``)."""
FILE = "model.onnx"
INSTALL = "install the export extra: pip install 'reglm[export]' (onnx and onnxruntime)"


def _runtime() -> Any:
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
        import onnxruntime
    except ImportError:
        raise ReglmError(f"--format onnx needs the onnx and onnxruntime packages; {INSTALL}") from None
    return onnxruntime


class _FlatState(torch.nn.Module):
    """The graph's signature: ``(tokens, *state) -> (log_probs, *new_state)``."""

    def __init__(self, lm: InferenceLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        log_probs, new_state = self.lm(tokens, list(state))
        return (log_probs, *new_state)


def export_bytes(lm: InferenceLM) -> bytes:
    """The float32 ONNX graph of ``lm``, serialized."""
    _runtime()
    inputs = ["tokens", *(t.input for t in lm.state)]
    outputs = ["log_probs", *(t.output for t in lm.state)]
    dynamic = {"tokens": {0: "batch", 1: "time"}, "log_probs": {0: "batch", 1: "time"}}
    dynamic.update({name: {t.shape.index("batch"): "batch"} for t in lm.state for name in (t.input, t.output)})
    example = (torch.zeros(2, 3, dtype=torch.long), *lm.initial_state(2))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*legacy TorchScript-based ONNX export.*", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="The feature will be removed", category=DeprecationWarning)
        # scripting the QRNN's loop while tracing
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings(
            "ignore", category=torch.jit.TracerWarning
        )  # nn.LSTM's shape checks, constant for a trace
        torch.onnx.export(
            _FlatState(lm),
            example,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def runner(model: bytes, threads: int | None = None) -> Callable[[Tensor, list[Tensor]], tuple[Tensor, list[Tensor]]]:
    """``step(tokens, state) -> (log_probs, state)`` over torch tensors, run by ONNX Runtime on the
    CPU (``threads``: intra-op threads, None for its default)."""
    ort = _runtime()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]

    def step(tokens: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        feeds = {"tokens": tokens.numpy()}
        feeds.update((name, s.numpy()) for name, s in zip(inputs[1:], state))
        out = session.run(None, feeds)
        return torch.from_numpy(out[0]), [torch.from_numpy(o) for o in out[1:]]

    return step


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice on the root logger ("consider pre-processing")."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize(model: bytes, workdir: Path) -> bytes:
    """``model`` (float32 graph bytes) with int8 dynamic quantization; ``workdir`` holds the
    quantizer's files meanwhile."""
    _runtime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = workdir / "float32.onnx", workdir / "int8.onnx"
    source.write_bytes(model)
    with _quiet_quantizer():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    data = target.read_bytes()
    source.unlink()
    target.unlink()
    return data


INTEGER_OPS = frozenset(
    {
        "DynamicQuantizeLSTM",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeMatMul",
        "QAttention",
        "QGemm",
    }
)


def quantized_ops(model: bytes) -> list[str]:
    """The integer (quantized) operator types in the graph ``model``, sorted."""
    import onnx

    return sorted({node.op_type for node in onnx.load_from_string(model).graph.node} & INTEGER_OPS)
