"""Checkpoints: shippable model directories and the resumable training state.

A *model directory* (``best/``, ``last/``) is self-contained and holds

- ``model.safetensors``: the weights (tied tensors stored once, restored as one tensor),
- ``config.json``: the run configuration plus the vocabulary size and fingerprint,
- ``vocab.txt``: the vocabulary, one ``token<TAB>count`` per line in id order.

The *training state* ``state.pt`` holds only state dicts, tensors, scalars and RNG states,
and is read with ``torch.load(weights_only=True)``: no pickled modules, so moving a class never
breaks a checkpoint. Every file is written to a temporary file and renamed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from reglm.config import RunConfig
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError
from reglm.io import write_json, write_with
from reglm.models import LanguageModel

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
STATE_FILE = "state.pt"


def save_model_dir(directory: Path, model: torch.nn.Module, config: RunConfig, vocab: Vocab, info: dict[str, Any] | None = None) -> None:
    """Write ``model`` (its current weights), its config and vocabulary into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_with(directory / MODEL_FILE, lambda tmp: save_model(model, str(tmp)))
    meta = {"config": config.to_dict(), "vocab_size": len(vocab), "vocab_fingerprint": vocab.fingerprint(), "info": info or {}}
    write_json(directory / CONFIG_FILE, meta)
    vocab.save(directory / VOCAB_FILE)


def read_model_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ReglmError(f"{path} is missing: {directory} is not a reglm model directory (expected {MODEL_FILE}, {CONFIG_FILE}, {VOCAB_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReglmError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged, use another one (best/ or last/)") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise ReglmError(f"{path} is not a reglm model config; point at a run directory or its best/ or last/")
    return meta


def load_model_dir(directory: Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, RunConfig, Vocab]:
    """Rebuild the model saved in ``directory``; every damaged or mismatched file is a ReglmError."""
    directory = Path(directory)
    meta = read_model_meta(directory)
    config = RunConfig.from_dict(meta["config"], source=str(directory / CONFIG_FILE))
    vocab_path = directory / VOCAB_FILE
    if not vocab_path.is_file():
        raise ReglmError(f"{vocab_path} is missing; the model directory is incomplete")
    vocab = Vocab.load(vocab_path)
    if len(vocab) != meta.get("vocab_size") or vocab.fingerprint() != meta.get("vocab_fingerprint"):
        raise ReglmError(
            f"{vocab_path} is not the vocabulary this checkpoint was built for "
            f"({len(vocab)} words vs {meta.get('vocab_size')}); restore the run's own vocab.txt"
        )
    model = LanguageModel(config.model, len(vocab))
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise ReglmError(f"{weights} is missing; the model directory is incomplete")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ReglmError(f"{weights} cannot be read ({_short(exc)}): it is truncated, corrupted or built for another model; use another checkpoint or retrain") from None
    if missing or unexpected:
        raise ReglmError(f"{weights} does not match the model in {CONFIG_FILE} (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return model.to(device), config, vocab


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_with(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ReglmError(f"{path} is missing: nothing to resume in {path.parent} (was it trained with reglm train?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same to the user
        raise ReglmError(f"{path} cannot be read ({_short(exc)}): the training state is truncated or corrupted; start a new run") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ReglmError(f"{path} is not a reglm training state")
    return state


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
