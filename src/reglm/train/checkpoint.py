"""The resumable training state ``state.pt`` of a run directory.

It holds only state dicts, tensors, scalars and RNG states, and is read with
``torch.load(weights_only=True)``: no pickled modules, so moving a class never breaks a
checkpoint. Every entry is checked on load (:func:`load_state`), so a damaged or edited file is
refused before anything is written. The file is written to a temporary file and renamed; nothing
non-finite is ever written (the trainer checks first). The shippable model directories
(``best/``, ``last/``) are :mod:`reglm.modeldir`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from reglm.config import RunConfig
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError
from reglm.io import write_with
from reglm.modeldir import is_int, short_reason
from reglm.models import LanguageModel
from reglm.rundir import CONFIG_FILE, STATE_FILE, VOCAB_FILE

__all__ = ["load_state", "load_state_model", "save_state"]


def save_state(path: Path, state: dict[str, Any]) -> None:
    write_with(Path(path), lambda fh: torch.save(state, fh))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_states(value: Any) -> bool:
    """A carried encoder state: None, or ``[[h, c], ...]`` tensors."""
    return value is None or (
        isinstance(value, list)
        and all(isinstance(p, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in p) for p in value)
    )


def _is_rng(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and "torch" in value
        and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in value.values())
    )


def _is_rank_parts(value: Any) -> bool:
    """The ``distributed`` entry: the world size and every rank's RNG and objective states."""
    if not isinstance(value, dict) or not is_int(value.get("world_size")) or value["world_size"] < 2:
        return False
    ranks = value.get("ranks")
    return (
        isinstance(ranks, list)
        and len(ranks) == value["world_size"]
        and all(
            isinstance(part, dict) and _is_rng(part.get("rng")) and isinstance(part.get("objective"), dict)
            for part in ranks
        )
    )


STATE_FORMAT = 2
"""Format 1 (before the trainer's schedule had state of its own) kept the plateau scale as ``lr_scale``."""

STATE_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format": (lambda v: v == STATE_FORMAT, f"format {STATE_FORMAT}"),
    "model": (_is_tensor_dict, "a dict of tensors"),
    "optimizer": (lambda v: isinstance(v, dict) and "state" in v and "param_groups" in v, "an optimizer state dict"),
    "averager": (lambda v: isinstance(v, dict), "a dict"),
    "trigger": (lambda v: isinstance(v, dict), "a dict"),
    "stage": (lambda v: v in ("main", "finetune", "done"), "main, finetune or done"),
    "epoch": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "step": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "position": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "hidden": (_is_states, "none or a list of state tensors"),
    "epoch_nll": (lambda v: _is_number(v) and math.isfinite(v), "a finite number"),
    "epoch_tokens": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "best_val": (_is_number, "a number"),
    "schedule": (lambda v: isinstance(v, dict), "a dict"),
    "objective": (lambda v: isinstance(v, dict), "a dict"),
    "metrics_bytes": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "vocab_fingerprint": (lambda v: isinstance(v, str), "a string"),
    "rng": (_is_rng, "RNG states"),
}
"""Every entry of ``state.pt``: a check and what it must be."""

OPTIONAL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "distributed": (_is_rank_parts, "the world size and every process's RNG and objective states"),
}
"""Entries only some runs write (``distributed``: a run of several processes, :mod:`reglm.train.distributed`;
``hidden`` and ``rng`` then hold the streams of the whole global batch and rank 0's RNG states)."""


def load_state(path: Path) -> dict[str, Any]:
    """Read and check ``state.pt``; a missing, unreadable or damaged file is a ReglmError."""
    path = Path(path)
    if not path.is_file():
        raise ReglmError(f"{path} is missing: nothing to resume in {path.parent} (was it trained with reglm train?)")
    fix = f"start a new run with another --out (or delete {path.parent})"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch raises many types for a damaged file; all mean the same to the user
        raise ReglmError(
            f"{path} cannot be read ({short_reason(exc)}): the training state is truncated or corrupted; {fix}"
        ) from None
    if not isinstance(state, dict):
        raise ReglmError(f"{path} is not a reglm training state; {fix}")
    if state.get("format") == 1:
        state["format"], state["schedule"] = STATE_FORMAT, {"scale": state.pop("lr_scale", 1.0)}
    for name, (ok, what) in STATE_FIELDS.items():
        if name not in state:
            raise ReglmError(f"{path} is damaged: it has no {name!r} entry; {fix}")
        if not ok(state[name]):
            raise ReglmError(f"{path} is damaged: its {name!r} entry is not {what}; {fix}")
    for name, (ok, what) in OPTIONAL_FIELDS.items():
        if name in state and not ok(state[name]):
            raise ReglmError(f"{path} is damaged: its {name!r} entry is not {what}; {fix}")
    return state


def load_state_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[LanguageModel, RunConfig, Vocab]:
    """The model of a run's latest ``state.pt`` (``reglm eval RUN --checkpoint state``): a run
    interrupted before it wrote ``best/`` or ``last/`` (its first epoch) can be scored. These are
    the weights validation would see: the averaged ones once averaging runs, else the iterate."""
    from reglm.config import load_config_file
    from reglm.config.kinds import component_class

    run_dir = Path(run_dir)
    config = load_config_file(run_dir / CONFIG_FILE)
    if config.data.tokenizer == "bpe":
        raise ReglmError(
            f"{run_dir}: --checkpoint state reads word models; a BPE run's tokenizer is saved with best/ and last/ "
            "(evaluate those)"
        )
    vocab = Vocab.load(run_dir / VOCAB_FILE)
    state = load_state(run_dir / STATE_FILE)
    if state["vocab_fingerprint"] != vocab.fingerprint():
        raise ReglmError(
            f"{run_dir / STATE_FILE} was built for another vocabulary than {run_dir / VOCAB_FILE}; "
            "restore the run's own files"
        )
    model = LanguageModel(config.model, len(vocab), vocab)
    averaging = component_class("averaging", config.train.averaging, "train.averaging")(config.train.averaging)
    try:
        model.load_state_dict(state["model"])
        averaging.load_state_dict(state)
        if averaging.active:
            model.load_state_dict(averaging.averaged_state(model))
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ReglmError(
            f"{run_dir / STATE_FILE} does not fit the run's {CONFIG_FILE} ({short_reason(exc)}); restore the run's "
            "own files"
        ) from None
    return model.to(device), config, vocab
