"""The run directory: every file name in it, and who may write it.

A run directory holds ``config.json`` from the moment a run is claimed (it is what makes a
directory a run), then ``vocab.txt``, ``environment.json``, ``metrics.jsonl``, ``state.pt``
(written before the first step, so every run directory can be resumed), ``best/``, ``last/``
and, once finished, ``results.json``.

One process at a time: a run is claimed with an exclusive ``flock`` on ``run.lock``, held for the
life of the process and released by the kernel however the process ends, so a ``kill -9`` never
leaves a lock behind that blocks the directory. The lock file also records who holds it (pid,
host, start time, command line); a second process is refused with that record, and one that
finds a record left by a process that is gone says so and takes over. ``flock`` is reliable on
local file systems; on network file systems that do not support it, run one process per run
directory by hand.

The compatibility checks between run and model directories are here too, once: the same
vocabulary (:func:`require_same_vocab`), the same architecture (:func:`require_same_architecture`)
and the kind of model a directory holds (:func:`require_kind`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reglm.config.kinds import registry
from reglm.config.schema import ModelConfig, architecture_differences
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError
from reglm.io import remove_temp_files

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
"""The sub-word tokenizer of a BPE model (Hugging Face ``tokenizers`` format), beside ``vocab.txt`` in model
directories."""
STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
ENVIRONMENT_FILE = "environment.json"
RESULTS_FILE = "results.json"
LOCK_FILE = "run.lock"
MODEL_FILE = "model.safetensors"
MODEL_DIRS = ("best", "last")


def is_run(directory: Path) -> bool:
    """Whether ``directory`` holds a run (its ``config.json``)."""
    return (Path(directory) / CONFIG_FILE).is_file()


@dataclass
class RunLock:
    """The claim of one process on a run directory; release it with :meth:`release` (or let the
    process end). ``previous`` is the record a process that is gone left in the lock file."""

    path: Path
    fd: int
    previous: dict[str, Any] | None = field(default=None)

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "argv": sys.argv,
    }


def _read_record(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        record = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (UnicodeDecodeError, ValueError):
        return {"pid": "?", "host": "?", "started": "?"}
    return record if isinstance(record, dict) else None


def _describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"


def _in_use(run_dir: Path, record: dict[str, Any] | None) -> ReglmError:
    return ReglmError(
        f"{run_dir} is in use by another reglm process ({_describe(record)}); wait for it to finish, "
        f"or stop it first (Ctrl-C saves a checkpoint) and then resume with `reglm train --resume {run_dir}`"
    )


def _busy(exc: OSError) -> bool:
    return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def acquire(run_dir: Path) -> RunLock:
    """Take the exclusive lock of ``run_dir`` (which must exist), or raise :class:`ReglmError`
    naming the process that holds it."""
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        record = _read_record(fd)
        os.close(fd)
        if _busy(exc):
            raise _in_use(run_dir, record) from None
        raise
    previous = _read_record(fd)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(_holder()) + "\n").encode("utf-8"))
    lock = RunLock(path, fd, previous)
    for directory in (Path(run_dir), *(Path(run_dir) / name for name in MODEL_DIRS)):
        remove_temp_files(directory)
    return lock


def _check_target(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ReglmError(f"--out {run_dir} is a file, not a directory; choose another --out")
    for parent in run_dir.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ReglmError(f"--out {run_dir}: {parent} is a file, not a directory; choose another --out")
            break


def _refuse_if_held(run_dir: Path) -> None:
    """Raise the in-use error when another process holds ``run_dir``'s lock; writes nothing
    (a shared lock on a read-only descriptor conflicts with the holder's exclusive one)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if _busy(exc):
            raise _in_use(run_dir, _read_record(fd)) from None
        raise
    finally:
        os.close(fd)


def _foreign_entries(run_dir: Path) -> list[str]:
    """What ``run_dir`` holds besides the lock file a claim may have left."""
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def claim_new(run_dir: Path) -> RunLock:
    """Claim ``run_dir`` for a new run: it must not exist, be empty, or hold only a lock file.

    Refuses (nothing written) a path that is a file or under a file, a directory that holds a
    run, and a non-empty directory that is not a run. The checks are repeated once the lock is
    held, so two processes started together cannot both start a run there.
    """
    run_dir = Path(run_dir)
    _check_target(run_dir)

    def refuse_if_used(locked: bool) -> None:
        if is_run(run_dir):
            raise ReglmError(
                f"{run_dir} already holds a run; resume it with `reglm train --resume {run_dir}`, or choose "
                "another --out"
            )
        if run_dir.is_dir():
            if not locked:
                _refuse_if_held(run_dir)
            entries = _foreign_entries(run_dir)
            if entries:
                shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
                raise ReglmError(
                    f"--out {run_dir} is a directory that is not empty and holds no run ({shown}); choose a new or "
                    "empty directory"
                )

    refuse_if_used(locked=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = acquire(run_dir)
    try:
        refuse_if_used(locked=True)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_existing(run_dir: Path) -> RunLock:
    """Claim the run in ``run_dir`` to resume it."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReglmError(f"run directory {run_dir} does not exist; give the --out of a run started with `reglm train`")
    if not run_dir.is_dir():
        raise ReglmError(
            f"{run_dir} is a file, not a run directory; give the --out of a run started with `reglm train`"
        )
    if not is_run(run_dir):
        raise ReglmError(
            f"{run_dir} holds no run ({CONFIG_FILE} is missing); start one there with `reglm train --out {run_dir}`"
        )
    return acquire(run_dir)


def describe_previous(lock: RunLock) -> str | None:
    """A line about the holder that left ``lock``'s record, if one did."""
    if lock.previous:
        return f"the previous process ({_describe(lock.previous)}) is gone; taking over {lock.path.parent}"
    return None


def model_dir(path: Path | str, which: str = "best") -> Path:
    """``RUN`` -> ``RUN/best`` (or ``RUN/last``); a model directory is returned as it is."""
    path = Path(path)
    if not path.exists():
        raise ReglmError(f"{path} does not exist; give a run directory (from reglm train) or a model directory")
    if (path / MODEL_FILE).is_file():
        return path
    if which not in MODEL_DIRS:
        raise ReglmError(f"checkpoint {which!r} is unknown; choose best or last")
    if (path / which / MODEL_FILE).is_file():
        return path / which
    raise ReglmError(
        f"{path} holds no {which}/{MODEL_FILE}; has the run finished an epoch? "
        f"(reglm eval {path} --checkpoint state scores its latest {STATE_FILE})"
    )


def require_same_vocab(have: Vocab, want: Vocab, subject: str, other: str, fix: str, strict: bool = False) -> None:
    """A ReglmError when ``subject``'s vocabulary ``have`` is not ``other``'s ``want``: the same id
    map (and, with ``strict``, the same training counts, i.e. the same training text)."""
    same = have == want if strict else have.fingerprint() == want.fingerprint()
    if not same:
        raise ReglmError(f"{subject} has another vocabulary ({len(have):,} words) than {other} ({len(want):,}); {fix}")


def require_same_architecture(have: ModelConfig, want: ModelConfig, subject: str, fix: str) -> None:
    """A ReglmError listing every shape-defining option where ``have`` differs from ``want``."""
    diff = architecture_differences(have, want)
    if diff:
        raise ReglmError(f"{subject} differs from the model's architecture in {'; '.join(diff)}; {fix}")


def require_kind(kind: str, directory: Path, want: str) -> None:
    """A ReglmError when the model in ``directory`` (trained with objective ``kind``) is not of the
    kind ``want`` (``lm``: a language model; ``discriminator``): what that objective declares its
    run's model is (``produces``)."""
    produced = registry("objective")[kind].produces
    if want == "discriminator" and produced != "discriminator":
        raise ReglmError(
            f"{directory} is not a discriminator (its run minimized objective {kind!r}); train one with `reglm "
            "train-discriminator RUN`"
        )
    if want == "lm" and produced == "discriminator":
        raise ReglmError(
            f"{directory} is a discriminator (Popov & Kudinov), not a language model; use it with `reglm finetune "
            f"RUN --discriminator {directory}`"
        )
