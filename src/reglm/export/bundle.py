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

All files are written into a hidden directory beside ``OUT``; the check runs on the model file
read back from there (what is on disk, not the bytes in memory), and the files are then renamed
into ``OUT`` one by one, ``export.json`` last. ``OUT`` must be new, empty, or a previous export
(it holds ``export.json``, which lists the files it wrote under ``files``); anything else is
refused. An export replaces only the files a previous export wrote (and removes those the new one
does not have, a ``model.pt`` after a switch to ONNX): a file of the user's in ``OUT`` is never
deleted, and one in the way of a new file is refused.
"""

from __future__ import annotations

import os
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
from reglm.export.modules import InferenceLM, inference_module
from reglm.export.quantize import CHUNK, Step, quantize_module, stream_perplexity
from reglm.io import read_json, temp_sibling, write_bytes, write_json
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
        onnx.FILE,
        onnx.export_bytes,
        lambda _module, data, work: onnx.quantize(data, work),
        onnx.runner,
        onnx.quantized_ops,
        lambda: _versions("onnxruntime", "onnx"),
        "onnxruntime.quantization.quantize_dynamic (QInt8 weights; LSTM, MatMul and embedding Gather)",
        {"opset": onnx.OPSET},
    ),
    "torchscript": Format(
        torchscript.FILE,
        torchscript.export_bytes,
        lambda module, _data, _work: torchscript.export_bytes(quantize_module(module)),
        torchscript.runner,
        torchscript.quantized_ops,
        lambda: _versions("torch"),
        "torch.ao.quantization.quantize_dynamic (qint8 nn.LSTM and nn.Linear, 8-bit rows of nn.Embedding)",
        {
            "call": "forward(tokens: Tensor, state: List[Tensor]) -> Tuple[Tensor, List[Tensor]]; state in the "
            "order of interface.state"
        },
    ),
}


@torch.no_grad()
def stream_difference(
    model: torch.nn.Module, step: Step, initial: Callable[[int], list[Tensor]], vocab_size: int, seed: int = 0
) -> float:
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
        worst = max(worst, float((log_probs - model.output.predict(out).cpu()).abs().max()))
    return worst


def _interface(module: InferenceLM, vocab_size: int) -> dict[str, Any]:
    state = module.state
    return {
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["batch", "time"]}]
        + [{"name": t.input, "dtype": "float32", "shape": list(t.shape)} for t in state],
        "outputs": [{"name": "log_probs", "dtype": "float32", "shape": ["batch", "time", vocab_size]}]
        + [{"name": t.output, "dtype": "float32", "shape": list(t.shape)} for t in state],
        "state": [{"input": t.input, "output": t.output} for t in state],
        "log_probs": "natural log of the next token's probability, normalized over the vocabulary",
    }


def check_options(format: str, quantize: str | None) -> None:
    """A ReglmError for a format or a quantization that does not exist."""
    if format not in FORMATS:
        raise ReglmError(f"--format {format} is not supported; choose {' or '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ReglmError(
            f"--quantize {quantize} is not supported; choose {' or '.join(QUANTIZATIONS)} (or leave it out for float32)"
        )


def _written_before(out: Path) -> set[str]:
    """The files the export in ``out`` wrote (its ``export.json`` and the files it lists; an
    older export, without the list: its model file, vocabulary and tokenizer); empty for none."""
    path = out / SPEC_FILE
    if not path.is_file():
        return set()
    spec = read_json(path, f"remove {path} or choose another --out")
    files = spec.get("files") if isinstance(spec, dict) else None
    kind = spec.get("format") if isinstance(spec, dict) else None
    fmt = FORMATS.get(kind) if isinstance(kind, str) else None
    older = fmt is not None and spec.get("file") == fmt.file
    if files is None and older:
        files = [spec["file"], VOCAB_FILE, TOKENIZER_FILE]
    if not isinstance(files, list):
        raise ReglmError(f"{path} is not an export.json of reglm (no list of files); remove it or choose another --out")
    return {name for name in files if isinstance(name, str) and name == Path(name).name} | {SPEC_FILE}


def check_out(out: Path, files: Sequence[str] = ()) -> set[str]:
    """``out`` may be written with ``files``: it is new, an empty directory or a previous export,
    and none of ``files`` there is a file of the user's; returns what the previous export wrote."""
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file, not a directory; choose another --out")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ReglmError(f"--out {out}: {parent} is a file, not a directory; choose another --out")
            break
    if not out.is_dir():
        return set()
    ours = _written_before(out)
    if not ours and any(out.iterdir()):
        raise ReglmError(
            f"--out {out} is a directory that is not empty and holds no export ({SPEC_FILE}); choose a new or "
            "empty directory"
        )
    for name in files:
        if name not in ours and (out / name).exists():
            raise ReglmError(
                f"--out {out} holds {name}, which no export wrote there; move it away or choose another --out"
            )
    return ours


def _publish(staging: Path, out: Path, files: Sequence[str]) -> None:
    """Move ``files`` from the finished ``staging`` directory into ``out`` (``export.json`` last),
    replacing what a previous export wrote there; then remove the previous export's files that
    the new one does not have. Nothing else in ``out`` is touched."""
    ours = check_out(out, files)
    out.mkdir(parents=True, exist_ok=True)
    for name in sorted(files, key=lambda name: name == SPEC_FILE):
        os.replace(staging / name, out / name)
    for name in sorted(ours - set(files)):
        (out / name).unlink(missing_ok=True)


def export_model(
    lm: Any,
    out: Path,
    format: str,
    quantize: str | None = None,
    eval_ids: Sequence[int] | Tensor | None = None,
    eval_source: str = "",
    source: Path | None = None,
) -> dict[str, Any]:
    """Export ``lm`` (a :class:`~reglm.api.TrainedModel`) into the directory ``out``; returns what
    ``export.json`` holds. ``quantize="int8"`` needs ``eval_ids`` (token ids of a text, described by
    ``eval_source``) to measure the perplexity change; ``source`` is recorded as the model's origin."""
    check_options(format, quantize)
    if quantize is not None and (eval_ids is None or len(eval_ids) < 2):
        raise ReglmError(
            "measuring the perplexity change of int8 needs a text of at least two tokens; give --text FILE"
        )
    out = Path(out)
    fmt = FORMATS[format]
    files = [fmt.file, VOCAB_FILE, *([TOKENIZER_FILE] if lm.subword is not None else []), SPEC_FILE]
    check_out(out, files)
    module = inference_module(lm.model)
    vocab_size = module.vocab_size
    data = fmt.export(module)
    float32 = data
    if quantize is not None:
        _require_close(format, fmt, stream_difference(lm.model, fmt.runner(float32), module.initial_state, vocab_size))
        with tempfile.TemporaryDirectory() as work:
            data = fmt.quantize(module, float32, Path(work))
    staging = temp_sibling(out)
    try:
        staging.mkdir(parents=True)
        write_bytes(staging / fmt.file, data)
        on_disk = (staging / fmt.file).read_bytes()
        diff = stream_difference(lm.model, fmt.runner(on_disk), module.initial_state, vocab_size)
        if quantize is None:
            _require_close(format, fmt, diff)
        spec = _spec(lm, module, format, fmt, quantize, source, diff, files)
        if quantize is not None:
            spec["quantization"] = _quantization(fmt, module, float32, on_disk, eval_ids, eval_source)
        lm.vocab.save(staging / VOCAB_FILE)
        if lm.subword is not None:
            lm.vocab.save_tokenizer(staging / TOKENIZER_FILE)
        write_json(staging / SPEC_FILE, spec)
        _publish(staging, out, files)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return spec


def _require_close(format: str, fmt: Format, diff: float) -> None:
    if not diff <= CHECK_TOLERANCE:
        raise ReglmError(
            f"the {format} export differs from the PyTorch model by {diff:.3g} in log-probability (> "
            f"{CHECK_TOLERANCE:g}); nothing was written; "
            f"this is a bug of reglm or of {fmt.runtime()}: please report it"
        )


def _quantization(
    fmt: Format,
    module: InferenceLM,
    float32: bytes,
    data: bytes,
    eval_ids: Sequence[int] | Tensor,
    eval_source: str,
) -> dict[str, Any]:
    """What ``export.json`` says of an int8 export ``data`` (the file read back) against ``float32``."""
    ops = fmt.quantized_ops(data)
    if not ops:
        raise RuntimeError(f"{fmt.int8_method} quantized nothing in the {fmt.file} export")
    blobs = {"float32": float32, "int8": data}
    ppl = {name: stream_perplexity(fmt.runner(blob), eval_ids, module.initial_state(1)) for name, blob in blobs.items()}
    return {
        "method": fmt.int8_method,
        "quantized_ops": ops,
        "float32_bytes": len(float32),
        "int8_bytes": len(data),
        "size_ratio": len(data) / len(float32),
        "perplexity": {
            "text": eval_source,
            "tokens": len(eval_ids) - 1,
            "read": (
                f"one stream in chunks of {CHUNK} tokens, state carried"
                if module.state
                else f"independent blocks of {CHUNK} tokens"
            ),
            **ppl,
            "change": ppl["int8"] / ppl["float32"] - 1.0,
        },
    }


def _spec(
    lm: Any,
    module: InferenceLM,
    format: str,
    fmt: Format,
    quantize: str | None,
    source: Path | None,
    diff: float,
    files: list[str],
) -> dict[str, Any]:
    """``export.json`` but for the quantization; ``diff``: the check on the file read back."""
    check = {
        "reference": "the trained PyTorch model (reglm), eval mode",
        "runtime": fmt.runtime(),
        "streams": CHECK_BATCH,
        "chunks": list(CHECK_CHUNKS),
        "state_carried": bool(module.state),
        "max_abs_log_prob_diff": diff,
        "on": "the model file read back from disk",
    }
    if quantize is not None:
        check["note"] = (
            "int8: the difference is the quantization error (no tolerance); the float32 export passed the check first"
        )
    from reglm import __version__

    vocab, vocab_size = lm.vocab, module.vocab_size
    return {
        "format": format,
        "file": fmt.file,
        "files": files,
        **fmt.details,
        "precision": quantize or "float32",
        "stateful": bool(module.state),
        "interface": _interface(module, vocab_size),
        "vocab": {
            "file": VOCAB_FILE,
            "size": len(vocab),
            "eos_id": vocab.eos_id,
            "unk_id": vocab.unk_id,
            "unknown_types": vocab.unknown_types(),
            "tokenizer": TOKENIZER_FILE if lm.subword is not None else None,
            "lines": "token<TAB>training count; line i (from 0) is the token of id i",
        },
        "model": {
            "input": lm.model.cfg.input.kind,
            "encoder": lm.model.cfg.encoder.kind,
            "output": lm.model.cfg.output.kind,
            "parameters": lm.model.num_parameters(),
            "source": None if source is None else str(source),
        },
        "check": check,
        "quantization": None,
        "versions": {"reglm": __version__, "torch": torch.__version__},
    }
