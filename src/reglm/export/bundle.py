"""The export directory: a model file, its vocabulary and ``export.json``, checked before it is written.

:func:`export_model` builds the inference module (:mod:`reglm.export.modules`), serializes it in
a format of :data:`FORMATS`, runs the result in its own runtime against the trained PyTorch model
over a stream of several chunks with the state carried (:func:`stream_difference`), optionally
quantizes it to int8 and measures the perplexity change on a text, and then writes::

    OUT/
      model.onnx | model.pt   the graph (ONNX) or the scripted module (TorchScript)
      vocab.txt               token<TAB>training count, line i = id i (the run's own file)
      tokenizer.json          BPE models only: the sub-word tokenizer (Hugging Face tokenizers)
      export.json             format, tensor names and shapes, state pairs, special ids, checks

All files are written into a hidden directory beside ``OUT`` and renamed into place at the end,
so ``OUT`` is either the previous export or the new one, never a mix. ``OUT`` must be new, empty,
or a previous export (it holds ``export.json``); anything else is refused.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reglm.errors import ReglmError
from reglm.export import onnx, torchscript
from reglm.export.modules import InferenceLM, inference_module, state_names
from reglm.export.quantize import CHUNK, Step, quantize_module, stream_perplexity
from reglm.io import temp_sibling, write_bytes, write_json
from reglm.rundir import TOKENIZER_FILE, VOCAB_FILE

SPEC_FILE = "export.json"
CHECK_BATCH = 2
CHECK_CHUNKS = (5, 1, 3)
"""The check's stream: ``CHECK_BATCH`` streams read in chunks of these lengths, state carried."""
CHECK_TOLERANCE = 1e-3
"""Largest accepted |log p(export) - log p(PyTorch)| of a float32 export (typically ~1e-6)."""
QUANTIZATIONS = ("int8",)


def _versions(*packages: str) -> str:
    from importlib.metadata import version

    return ", ".join(f"{name} {version(name)}" for name in packages)


@dataclass(frozen=True)
class Format:
    """One export format: its file, how to serialize and quantize an inference module, and how to
    run the result (``runner(data) -> step``)."""

    file: str
    export: Callable[[InferenceLM], bytes]
    quantize: Callable[[InferenceLM, bytes, Path], bytes]
    runner: Callable[[bytes], Step]
    quantized_ops: Callable[[bytes], list[str]]
    runtime: Callable[[], str]
    int8_method: str
    details: dict[str, Any]
    """What ``export.json`` says of the format besides the common fields."""


FORMATS = {
    "onnx": Format(
        onnx.FILE, onnx.export_bytes, lambda _module, data, work: onnx.quantize(data, work), onnx.runner, onnx.quantized_ops,
        lambda: _versions("onnxruntime", "onnx"), "onnxruntime.quantization.quantize_dynamic (QInt8 weights; LSTM, MatMul and embedding Gather)",
        {"opset": onnx.OPSET},
    ),
    "torchscript": Format(
        torchscript.FILE, torchscript.export_bytes, lambda module, _data, _work: torchscript.export_bytes(quantize_module(module)),
        torchscript.runner, torchscript.quantized_ops, lambda: _versions("torch"),
        "torch.ao.quantization.quantize_dynamic (qint8 nn.LSTM and nn.Linear, 8-bit rows of nn.Embedding)",
        {"call": "forward(tokens: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]; state in the order of interface.state"},
    ),
}


@torch.no_grad()
def stream_difference(model: torch.nn.Module, step: Step, initial: Callable[[int], list[Tensor]], vocab_size: int, seed: int = 0) -> float:
    """Largest |log p| difference between ``model`` (a :class:`~reglm.models.LanguageModel` in eval
    mode) and ``step`` over :data:`CHECK_CHUNKS` chunks of :data:`CHECK_BATCH` random streams,
    each side carrying its own state from its zero state (``initial(B)`` for ``step``)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    reference = model.init_state(CHECK_BATCH, device=device)
    state = initial(CHECK_BATCH)
    worst = 0.0
    for length in CHECK_CHUNKS:
        ids = torch.randint(0, vocab_size, (CHECK_BATCH, length), generator=generator)
        out = model(ids.to(device), reference)
        reference = out.state
        log_probs, state = step(ids, state)
        worst = max(worst, float((log_probs - model.output_log_probs(out).cpu()).abs().max()))
    return worst


def _interface(module: InferenceLM, vocab_size: int) -> dict[str, Any]:
    names = state_names(module.state_sizes)
    return {
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", "time"]}] + [{"name": n.input, "dtype": "float32", "shape": [1, "batch", n.size]} for n in names],
        "outputs": [{"name": "log_probs", "dtype": "float32", "shape": ["batch", "time", vocab_size]}] + [{"name": n.output, "dtype": "float32", "shape": [1, "batch", n.size]} for n in names],
        "state": [{"input": n.input, "output": n.output} for n in names],
        "log_probs": "natural log of the next token's probability, normalized over the vocabulary",
    }


def check_options(format: str, quantize: str | None) -> None:
    """A ReglmError for a format or a quantization that does not exist."""
    if format not in FORMATS:
        raise ReglmError(f"--format {format} is not supported; choose {' or '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ReglmError(f"--quantize {quantize} is not supported; choose {' or '.join(QUANTIZATIONS)} (or leave it out for float32)")


def check_out(out: Path) -> None:
    """``out`` may be written: new, an empty directory or a previous export; else a ReglmError."""
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file, not a directory; choose another --out")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ReglmError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
            break
    if out.is_dir() and any(out.iterdir()) and not (out / SPEC_FILE).is_file():
        raise ReglmError(f"--out {out} is a directory that is not empty and holds no export ({SPEC_FILE}); choose a new or empty directory")


def _publish(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out``, replacing a previous export there."""
    previous = temp_sibling(out) if out.exists() else None
    if previous is not None:
        out.rename(previous)
    try:
        staging.rename(out)
    except OSError:
        if previous is not None:
            previous.rename(out)
        raise
    if previous is not None:
        shutil.rmtree(previous)


def export_model(
    lm: Any, out: Path, format: str, quantize: str | None = None, eval_ids: Sequence[int] | Tensor | None = None, eval_source: str = "",
    source: Path | None = None,
) -> dict[str, Any]:
    """Export ``lm`` (a :class:`~reglm.api.TrainedModel`) into the directory ``out``; returns what
    ``export.json`` holds. ``quantize="int8"`` needs ``eval_ids`` (token ids of a text, described by
    ``eval_source``) to measure the perplexity change; ``source`` is recorded as the model's origin."""
    check_options(format, quantize)
    if quantize is not None and (eval_ids is None or len(eval_ids) < 2):
        raise ReglmError("measuring the perplexity change of int8 needs a text of at least two tokens; give --text FILE")
    out = Path(out)
    check_out(out)
    fmt = FORMATS[format]
    module = inference_module(lm.model)
    vocab_size = module.vocab_size
    data = fmt.export(module)
    diff = stream_difference(lm.model, fmt.runner(data), module.initial_state, vocab_size)
    if not diff <= CHECK_TOLERANCE:
        raise ReglmError(f"the {format} export differs from the PyTorch model by {diff:.3g} in log-probability (> {CHECK_TOLERANCE:g}); nothing was written; "
                         f"this is a bug of reglm or of {fmt.runtime()}: please report it")
    check = {
        "reference": "the trained PyTorch model (reglm), eval mode",
        "runtime": fmt.runtime(),
        "streams": CHECK_BATCH,
        "chunks": list(CHECK_CHUNKS),
        "state_carried": bool(module.state_sizes),
        "max_abs_log_prob_diff": diff,
    }
    quantization = None
    if quantize is not None:
        with tempfile.TemporaryDirectory() as work:
            float32, data = data, fmt.quantize(module, data, Path(work))
        ops = fmt.quantized_ops(data)
        if not ops:
            raise RuntimeError(f"{fmt.int8_method} quantized nothing in the {format} export")
        check["max_abs_log_prob_diff"] = stream_difference(lm.model, fmt.runner(data), module.initial_state, vocab_size)
        check["note"] = "int8: the difference is the quantization error (no tolerance); the float32 export passed the check first"
        ppl = {name: stream_perplexity(fmt.runner(blob), eval_ids, module.initial_state(1)) for name, blob in (("float32", float32), ("int8", data))}
        quantization = {
            "method": fmt.int8_method,
            "quantized_ops": ops,
            "float32_bytes": len(float32),
            "int8_bytes": len(data),
            "size_ratio": len(data) / len(float32),
            "perplexity": {
                "text": eval_source, "tokens": len(eval_ids) - 1,
                "read": f"one stream in chunks of {CHUNK} tokens, state carried" if module.state_sizes else f"independent blocks of {CHUNK} tokens",
                **ppl, "change": ppl["int8"] / ppl["float32"] - 1.0,
            },
        }
    from reglm import __version__

    vocab = lm.vocab
    spec = {
        "format": format,
        "file": fmt.file,
        **fmt.details,
        "precision": quantize or "float32",
        "stateful": bool(module.state_sizes),
        "interface": _interface(module, vocab_size),
        "vocab": {
            "file": VOCAB_FILE, "size": len(vocab), "eos_id": vocab.eos_id, "unk_id": vocab.unk_id,
            "unknown_types": vocab.unknown_types(),
            "tokenizer": TOKENIZER_FILE if lm.subword is not None else None,
            "lines": "token<TAB>training count; line i (from 0) is the token of id i",
        },
        "model": {
            "input": lm.model.cfg.input.kind, "encoder": lm.model.cfg.encoder.kind, "output": lm.model.cfg.output.kind,
            "parameters": lm.model.num_parameters(), "source": None if source is None else str(source),
        },
        "check": check,
        "quantization": quantization,
        "versions": {"reglm": __version__, "torch": torch.__version__},
    }
    staging = temp_sibling(out)
    try:
        write_bytes(staging / fmt.file, data)
        vocab.save(staging / VOCAB_FILE)
        if lm.subword is not None:
            vocab.save_tokenizer(staging / TOKENIZER_FILE)
        write_json(staging / SPEC_FILE, spec)
        check_out(out)
        _publish(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return spec
