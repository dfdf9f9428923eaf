"""Starting, resuming and finishing a run: what ``reglm train`` calls.

:func:`train` starts a new run in a run directory, :func:`resume` continues one from its last
checkpoint (or starts it over from its ``config.json`` when it stopped before writing one); both
hold the run directory (:mod:`reglm.rundir`) for the life of the run and hand the work to the
:class:`~reglm.train.trainer.Trainer`. The command line passes a :class:`StopRequest` that its
signal handlers set; as a library, ``KeyboardInterrupt`` goes through as usual.

Under ``torchrun`` both run on every process (:func:`~reglm.train.launch.launch` joins them;
one process alone is unchanged): each rank loads the corpus and builds the trainer, rank 0 alone
claims and writes the run directory, and every step that could fail on some ranks only is an
agreement, so that all ranks stop together. ``resume`` reads ``config.json`` and ``state.pt`` on
every rank: the run directory must be on a file system every node sees.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reglm.config import RunConfig, load_config_file
from reglm.data import Corpus, Vocab, load_corpus
from reglm.devices import resolve_device
from reglm.errors import TrainingDiverged, TrainingInterrupted
from reglm.io import write_json
from reglm.rundir import (
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    STATE_FILE,
    VOCAB_FILE,
    RunLock,
    claim_existing,
    require_same_vocab,
)
from reglm.train.checkpoint import load_state
from reglm.train.launch import launch
from reglm.train.setup import session_record
from reglm.train.trainer import StepHook, StopRequest, Trainer

__all__ = [
    "StopRequest",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "load_corpus",
    "resolve_device",
    "resume",
    "train",
]


def train(
    config: RunConfig,
    run_dir: Path,
    progress: bool | None = None,
    stop: StopRequest | None = None,
    corpus: Corpus | None = None,
    step_hooks: Sequence[StepHook] = (),
) -> dict[str, Any]:
    """Start a new run in ``run_dir`` and train it to the end (``corpus``: the one ``config``
    names, when already loaded; ``step_hooks``: see :attr:`Trainer.step_hooks`)."""
    with launch() as dist:
        with dist.agreement():
            corpus = corpus if corpus is not None else load_corpus(config)
            trainer = Trainer(config, run_dir, corpus, progress, stop, dist=dist)
        trainer.step_hooks.extend(step_hooks)
        try:
            trainer.start()
            trainer.say(
                f"run {run_dir}: {trainer.model.num_parameters():,} parameters, vocabulary {len(corpus.vocab):,}, "
                f"device {trainer.device}"
            )
        except BaseException:
            trainer.close()
            raise
        return trainer.run()


def resume(
    run_dir: Path,
    progress: bool | None = None,
    stop: StopRequest | None = None,
    corpus: Corpus | None = None,
    step_hooks: Sequence[StepHook] = (),
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint (or start it over from its
    ``config.json`` when it stopped before writing one). Everything is checked before anything
    is written."""
    run_dir = Path(run_dir)
    with launch() as dist:
        lock: RunLock | None = None
        try:
            with dist.agreement():
                lock = claim_existing(run_dir) if dist.is_main else None
                config = load_config_file(run_dir / CONFIG_FILE)
                state = load_state(run_dir / STATE_FILE) if (run_dir / STATE_FILE).is_file() else None
                corpus = corpus if corpus is not None else load_corpus(config)
                if state is not None:
                    require_same_vocab(
                        corpus.vocab,
                        Vocab.load(run_dir / VOCAB_FILE),
                        f"the corpus {config.data.name!r}",
                        f"{run_dir / VOCAB_FILE}",
                        "resume with the data the run was started on",
                        strict=True,
                    )
                trainer = Trainer(config, run_dir, corpus, progress, stop, lock, dist)
                trainer.step_hooks.extend(step_hooks)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        try:
            trainer.report_takeover()
            if state is None:
                trainer.restart()
            else:
                with dist.agreement():
                    trainer.load_state_dict(state)
                session = session_record(trainer.device, trainer.corpus) | dist.record()
                dist.on_main(lambda: write_json(run_dir / ENVIRONMENT_FILE, _read_environment(run_dir) + [session]))
                trainer.say(
                    f"resuming {run_dir} at stage {trainer.stage}, epoch "
                    f"{trainer.epoch + (trainer.stage != 'done')}, step {trainer.step}"
                )
        except BaseException:
            trainer.close()
            raise
        return trainer.run()


def _read_environment(run_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((run_dir / ENVIRONMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else [data]
