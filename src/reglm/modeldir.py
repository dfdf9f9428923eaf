"""Model directories: the shippable form of a trained model (a run's ``best/`` and ``last/``).

A model directory is self-contained and holds

- ``model.safetensors``: the weights; a tensor shared by several parameters (tied weights) is
  stored once under its first name and restored as one tensor;
- ``config.json``: the run configuration plus the vocabulary size and fingerprint,
- ``vocab.txt``: the vocabulary, one ``token<TAB>count`` per line in id order,
- ``tokenizer.json`` (BPE models only, ``data.tokenizer=bpe``): the Hugging Face ``tokenizers``
  tokenizer that segments words into the units of ``vocab.txt``, with the same ids. Loading
  checks that the two agree; the loaded vocabulary is then a :class:`~reglm.data.bpe.BPEVocab`
  carrying the tokenizer (``vocab.hf_tokenizer``).

Every file is checked on load before anything large is allocated (a damaged, edited or hostile
directory is a ReglmError), and written to a temporary file and renamed. Inference (the API, the
hub, scoring, serving, export) reads models from here; the trainer writes them here. The
resumable training state (``state.pt``) is the trainer's: :mod:`reglm.train.checkpoint`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from reglm.config import RunConfig
from reglm.config.presets import CONFIG_BYTES
from reglm.data.bpe import BPEVocab
from reglm.data.vocab import Vocab
from reglm.devices import check_model_size
from reglm.errors import ReglmError
from reglm.io import read_json, write_bytes, write_json
from reglm.models import LanguageModel, shapes_only
from reglm.rundir import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, VOCAB_FILE

LOADING_BYTES_PER_PARAMETER = 12
"""Memory a loaded parameter takes at its peak: the file's bytes, the tensors read from them and
the model's own float32 copy."""

__all__ = ["load_model_dir", "read_model_meta", "save_model_dir"]


def _alias_groups(model: torch.nn.Module) -> list[list[str]]:
    """The state-dict names of ``model`` grouped by the tensor they hold, in state-dict order."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def weights_bytes(model: torch.nn.Module) -> bytes:
    """``model``'s weights as safetensors bytes, each shared tensor once (under its first name)."""
    state = model.state_dict()
    return save_safetensors({names[0]: state[names[0]].contiguous() for names in _alias_groups(model)})


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
"""The safetensors header's name of each dtype a model's state can hold."""
HEADER_BYTES = 100 << 20
"""The largest safetensors header read (the format's own limit)."""


def _stored_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """The ``name: (dtype, shape)`` of every tensor in the safetensors file ``path``, from its
    header alone (bounded, nothing else read), checked to describe exactly the bytes of the file."""
    damaged = f"{path} is not a complete safetensors file"
    fix = "it is truncated, corrupted or not a model file; use another checkpoint or retrain"
    size = path.stat().st_size
    with open(path, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
        if not 0 < length <= min(size - 8, HEADER_BYTES):
            raise ReglmError(f"{damaged} (its header length does not fit the file); {fix}")
        try:
            header = json.loads(fh.read(length))
        except (RecursionError, UnicodeDecodeError, ValueError):
            raise ReglmError(f"{damaged} (its header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise ReglmError(f"{damaged} (its header is not a table of tensors); {fix}")
    header.pop("__metadata__", None)
    tensors, data = {}, 0
    for name, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = info.get("dtype") if isinstance(info, dict) else None
        valid_shape = isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)
        if dtype not in SAFETENSORS_DTYPES.values() or not valid_shape:
            raise ReglmError(f"{damaged} (tensor {name!r} has no valid dtype and shape); {fix}")
        tensors[name] = (dtype, shape)
        data += math.prod(shape) * _ITEM_BYTES[dtype]
    if data != size - 8 - length:
        raise ReglmError(
            f"{damaged} (its tensors take {data:,} bytes, the file holds {size - 8 - length:,} after the header); {fix}"
        )
    return tensors


_ITEM_BYTES = {name: torch.tensor([], dtype=dtype).element_size() for dtype, name in SAFETENSORS_DTYPES.items()}


def check_weights_file(path: Path, shapes: dict[str, torch.Tensor], groups: list[list[str]]) -> None:
    """A ReglmError unless the safetensors file ``path`` holds, under one name of each group of
    shared names (``groups``), a tensor of the dtype and shape ``shapes`` gives it (the tensors of
    a model built on the meta device), and nothing else: read from the header, before anything
    is allocated, so that a ``config.json`` asking for absurd sizes is refused at once."""
    stored = _stored_tensors(path)
    fix = f"the weights do not belong to the model its {CONFIG_FILE} describes; use the checkpoint's own {CONFIG_FILE}"
    seen = set()
    for names in groups:
        name = next((n for n in names if n in stored), None)
        if name is None:
            raise ReglmError(f"{path} has no tensor {names[0]!r}; {fix}")
        seen.add(name)
        want = shapes[names[0]]
        dtype, shape = stored[name]
        if dtype != SAFETENSORS_DTYPES.get(want.dtype) or shape != list(want.shape):
            need = f"{SAFETENSORS_DTYPES.get(want.dtype)} {list(want.shape)}"
            raise ReglmError(f"{path}: tensor {name!r} is {dtype} {shape}, the model needs {need}; {fix}")
    unexpected = sorted(set(stored) - seen)
    if unexpected:
        names = ", ".join(map(repr, unexpected[:3]))
        raise ReglmError(f"{path} holds tensors the model does not have ({names}); {fix}")


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load ``path`` (written by :func:`weights_bytes`, or by ``safetensors.torch.save_model``,
    which may keep another name of a shared tensor) into ``model``, strictly: names, dtypes and
    shapes as the model's, every floating-point value finite."""
    path = Path(path)
    check_weights_file(path, model.state_dict(), _alias_groups(model))
    try:
        tensors = load_safetensors(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ReglmError(
            f"{path} cannot be read ({short_reason(exc)}): it is truncated, corrupted or not a model file; use "
            "another checkpoint or retrain"
        ) from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ReglmError(
                f"{path}: tensor {name!r} holds NaN or infinite values; "
                "the checkpoint is damaged (reglm never saves them), use another one"
            )
    state: dict[str, torch.Tensor] = {}
    missing = []
    for names in _alias_groups(model):
        stored = [name for name in names if name in tensors]
        if not stored:
            missing.append(names[0])
            continue
        for name in names:
            state[name] = tensors[stored[0]]
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise ReglmError(
            f"{path} does not match the model in {CONFIG_FILE} (missing {sorted(missing)[:3]}, unexpected "
            f"{unexpected[:3]}); use the checkpoint's own config.json"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ReglmError(
            f"{path} does not fit the model in {CONFIG_FILE} ({short_reason(exc)}); use the checkpoint's own "
            "config.json"
        ) from None


def save_model_dir(
    directory: Path, model: torch.nn.Module, config: RunConfig, vocab: Vocab, info: dict[str, Any] | None = None
) -> None:
    """Write ``model`` (its current weights), its config and vocabulary into ``directory``
    (and ``tokenizer.json`` when ``vocab`` is a BPE model's :class:`~reglm.data.bpe.BPEVocab`)."""
    directory = Path(directory)
    subword = isinstance(vocab, BPEVocab)
    if subword != (config.data.tokenizer == "bpe"):
        raise ValueError(
            f"config data.tokenizer={config.data.tokenizer} but the vocabulary is "
            f"{'a BPE' if subword else 'a word'} vocabulary"
        )
    directory.mkdir(parents=True, exist_ok=True)
    write_bytes(directory / MODEL_FILE, weights_bytes(model))
    meta = {
        "config": config.to_dict(),
        "vocab_size": len(vocab),
        "vocab_fingerprint": vocab.fingerprint(),
        "info": info or {},
    }
    if subword:
        meta["tokenizer_fingerprint"] = vocab.tokenizer_fingerprint()
    write_json(directory / CONFIG_FILE, meta)
    vocab.save(directory / VOCAB_FILE)
    if subword:
        vocab.save_tokenizer(directory / TOKENIZER_FILE)
    else:
        (directory / TOKENIZER_FILE).unlink(missing_ok=True)


def read_model_meta(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ReglmError(f"{directory} is not a directory; give a run directory or its best/ or last/")
    if not path.is_file():
        raise ReglmError(
            f"{directory} is not a reglm model directory (it has no {CONFIG_FILE}; expected {MODEL_FILE}, "
            f"{CONFIG_FILE}, {VOCAB_FILE})"
        )
    meta = read_json(path, "the checkpoint is damaged, use another one (best/ or last/)", max_bytes=CONFIG_BYTES)
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ReglmError(f"{path} is not a reglm model config; point at a run directory or its best/ or last/")
    return meta


def load_model_dir(directory: Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, RunConfig, Vocab]:
    """Rebuild the model saved in ``directory``; every damaged or mismatched file is a ReglmError."""
    directory = Path(directory)
    meta = read_model_meta(directory)
    config = RunConfig.from_dict(meta["config"], source=str(directory / CONFIG_FILE))
    vocab_path = directory / VOCAB_FILE
    if not vocab_path.is_file():
        raise ReglmError(
            f"{vocab_path} is missing; the model directory is incomplete (copy the run's vocab.txt into it)"
        )
    vocab = Vocab.load(vocab_path)
    if len(vocab) != meta.get("vocab_size") or vocab.fingerprint() != meta.get("vocab_fingerprint"):
        raise ReglmError(
            f"{vocab_path} is not the vocabulary this checkpoint was built for "
            f"({len(vocab)} words vs {meta.get('vocab_size')}); restore the run's own vocab.txt"
        )
    vocab = _with_tokenizer(directory, config, meta, vocab)
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise ReglmError(f"{weights} is missing; the model directory is incomplete")
    try:
        with shapes_only():
            shapes = LanguageModel(config.model, len(vocab), vocab)
    except RuntimeError:
        raise ReglmError(
            f"{directory / CONFIG_FILE} describes a model too large to build (its tensor sizes overflow); "
            "it is damaged, use another checkpoint"
        ) from None
    check_weights_file(weights, shapes.state_dict(), _alias_groups(shapes))
    fix = f"load it on a machine with more memory (or check {directory / CONFIG_FILE})"
    check_model_size(config, len(vocab), torch.device(device), LOADING_BYTES_PER_PARAMETER, "loading", fix)
    model = LanguageModel(config.model, len(vocab), vocab)
    load_weights(model, weights)
    return model.to(device), config, vocab


def _with_tokenizer(directory: Path, config: RunConfig, meta: dict[str, Any], vocab: Vocab) -> Vocab:
    """``vocab`` with the model directory's ``tokenizer.json`` for a BPE model (checked against
    ``vocab.txt`` and against the checkpoint), ``vocab`` itself for a word model."""
    path = directory / TOKENIZER_FILE
    bpe = config.data.tokenizer == "bpe"
    if not bpe:
        if path.exists():
            raise ReglmError(
                f"{directory} holds a {TOKENIZER_FILE} but its {CONFIG_FILE} is a word model "
                f"(data.tokenizer=word); remove the stray {path}"
            )
        return vocab
    if not path.is_file():
        raise ReglmError(
            f"{path} is missing; the model directory of a BPE model (data.tokenizer=bpe) needs the tokenizer.json "
            "it was trained with (copy it from the run's model directory)"
        )
    subword = BPEVocab.from_tokenizer_file(vocab, path)
    expected = meta.get("tokenizer_fingerprint")
    if expected is not None and subword.tokenizer_fingerprint() != expected:
        raise ReglmError(
            f"{path} is not the tokenizer this checkpoint was saved with (its merges differ); restore the model "
            "directory's own tokenizer.json"
        )
    return subword


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def short_reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message, at most 160 characters (its type when it has none)."""
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
