"""What ``state.pt`` holds of a run, and putting it back: the trainer's resume state.

``state.pt`` is written before the first step, at every epoch end, every
``train.checkpoint_interval`` steps and when a stop is requested. It holds the weights, the
optimizer's and the averaging policy's state, the schedule's, the stage, epoch, step, the
position in the training stream, the carried encoder state, the epoch's running loss, the
objective's state (its frozen models' carried states) and every RNG state, so on CPU a resumed
run ends with the same weights, bit for bit, as an uninterrupted one. Under data parallelism
(:mod:`reglm.train.distributed`) the per-rank parts are gathered into one file and shared out again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from reglm.encoders.base import state_dict_of
from reglm.errors import ReglmError
from reglm.rundir import CONFIG_FILE
from reglm.train.checkpoint import STATE_FILE
from reglm.train.setup import manifest_hash, require_same_data

if TYPE_CHECKING:
    from reglm.train.trainer import Trainer

FORMAT = 2
"""The layout of ``state.pt`` this module writes (format 1, of before the component layout, is
migrated on read by :func:`~reglm.train.checkpoint.load_state`)."""


def run_state(trainer: Trainer) -> dict[str, Any]:
    """The resume state of ``trainer`` (a :class:`~reglm.train.trainer.Trainer` whose loss sums
    are flushed), gathered from every process."""
    rng = {"torch": torch.get_rng_state()}
    if trainer.batches.rng is not None:
        rng["bptt"] = trainer.batches.rng.get_state()
    if trainer.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(trainer.device)
    state = {
        "format": FORMAT,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        **trainer.averaging.state_dict(),
        "schedule": trainer.schedule.state_dict(),
        "stage": trainer.stage,
        "epoch": trainer.epoch,
        "step": trainer.step,
        "position": trainer.position,
        "hidden": state_dict_of(trainer.hidden),
        "epoch_nll": trainer.epoch_nll,
        "epoch_tokens": trainer.epoch_tokens,
        "best_val": trainer.best_val,
        "objective": trainer.objective.state_dict(),
        "metrics_bytes": trainer.metrics.size(),
        "vocab_fingerprint": trainer.vocab.fingerprint(),
        "data_manifest": manifest_hash(trainer.corpus),
        "rng": rng,
    }
    return trainer.dist.gather_state(state, trainer.model.encoder)


def restore(trainer: Trainer, state: dict[str, Any]) -> None:
    """Put ``state`` (as from :func:`~reglm.train.checkpoint.load_state`) back into ``trainer``; an
    entry that does not fit the run is a ReglmError, raised before anything is written."""
    path = trainer.run_dir / STATE_FILE
    state = trainer.dist.local_state(state, trainer.model.encoder, trainer.batches.streams, path)
    if state["vocab_fingerprint"] != trainer.vocab.fingerprint():
        raise ReglmError(
            f"{path} was built for another vocabulary than the corpus {trainer.config.data.name!r} now gives; "
            "resume with the original data"
        )
    require_same_data(state.get("data_manifest"), trainer.corpus, path)
    if not trainer.batches.fits(state["position"]):
        raise ReglmError(
            f"{path} does not fit the run in {CONFIG_FILE} (its position in the training stream is beyond it); "
            "resume it with its own config.json"
        )
    entry = "model"
    try:
        trainer.model.load_state_dict(state["model"])
        entry = "optimizer"
        trainer.optimizer.load_state_dict(state["optimizer"])
        entry = "averager"
        trainer.averaging.load_state_dict(state)
        entry = "schedule"
        trainer.schedule.load_state_dict(state["schedule"])
        entry = "objective"
        trainer.objective.load_state_dict(state["objective"])
        entry = "hidden"
        hidden = (
            None if state["hidden"] is None else trainer.model.encoder.load_state(state["hidden"]).to(trainer.device)
        )
        entry = "rng"
        torch.set_rng_state(state["rng"]["torch"])
        if trainer.batches.rng is not None:
            trainer.batches.rng.set_state(state["rng"]["bptt"])
        if trainer.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], trainer.device)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise ReglmError(
            f"{path}: its {entry!r} entry does not fit the run in {CONFIG_FILE} ({_first_line(exc)}); resume with "
            "the run's own files, or start a new run with another --out"
        ) from None
    trainer.stage, trainer.epoch, trainer.step, trainer.position = (
        state["stage"],
        state["epoch"],
        state["step"],
        state["position"],
    )
    trainer.hidden = hidden
    trainer.epoch_nll, trainer.epoch_tokens, trainer.best_val = (
        float(state["epoch_nll"]),
        state["epoch_tokens"],
        float(state["best_val"]),
    )
    trainer.metrics.truncate(state["metrics_bytes"], first_step=trainer.step + 1)
    trainer.last_checkpoint = trainer.checkpoint_name()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
