"""The ``reglm`` command line: one module per command family.

Subcommands: ``train``, ``train-discriminator``, ``finetune`` (:mod:`reglm.cli.train`), ``eval``
(:mod:`reglm.cli.eval`), ``score`` (:mod:`reglm.cli.score`), ``serve`` (:mod:`reglm.cli.serve`),
``generate``, ``analyze``, ``study``, ``data download|info``,
``presets``, ``config`` (:mod:`reglm.cli.data`). Model and training options are not flags of
their own: any option of the run configuration is set with ``section.option=value`` (``reglm
config`` lists them), applied after ``--preset``. User mistakes and failing operating-system
calls print one line ``reglm: error: ...`` and exit with status 2. Under ``torchrun`` every rank
exits with the same status and rank 0 alone prints (:func:`_report`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import platform
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from reglm.cli import analyze, data, eval, export, generate, reproduce, score, serve, study, train
from reglm.cli.common import add_threads_option, handling_signals, set_threads
from reglm.errors import ReglmError, TrainingDiverged, TrainingInterrupted

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
FAMILIES = (train, eval, score, serve, generate, export, analyze, study, data, reproduce)
"""Each registers its subcommands on the parser (``register(sub)``), with ``func`` to run."""


def _installed(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_line() -> str:
    """``reglm X (torch Y, Python Z)``, from the installed packages' metadata (imports no torch)."""
    return f"reglm {_installed('reglm')} (torch {_installed('torch')}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reglm", description="Regularized word-level neural language models.")
    parser.add_argument(
        "--version",
        action="version",
        version=version_line(),
        help="print the versions of reglm, torch and Python, and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    for name, command in sub.choices.items():
        if name not in LIGHT_COMMANDS:
            add_threads_option(command)
    return parser


FIXES = {
    errno.ENOSPC: "free some disk space (or choose another path), then run the command again",
    errno.EDQUOT: "free some of your disk quota (or choose another path), then run the command again",
    errno.EFBIG: (
        "the file is larger than this process may write (ulimit -f, or the file system's limit); "
        "raise the limit or choose another path"
    ),
    errno.EACCES: "check the permissions of that path, or choose another one",
    errno.EPERM: "check the permissions of that path, or choose another one",
    errno.EROFS: "that file system is read-only; choose a path on a writable one",
    errno.EEXIST: "that path already exists; choose another one",
    errno.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
    errno.EISDIR: "that path is a directory; give a file name",
    errno.ENOENT: "check that the path exists",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the device reported an I/O error; check the disk, then try again",
}
"""What to tell the user for the OS errors a command can meet (writes keep the previous file)."""
RESUMABLE = ("train", "train-discriminator", "finetune")
"""Commands whose run a failed write leaves resumable: their message says how to go on."""
SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


def os_error_message(exc: OSError, command: str | None = None) -> str:
    """``exc`` as one line: the path, what went wrong and the fix (for a write that a training
    command failed, how to resume the run)."""
    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or str(exc)
    fix = FIXES.get(exc.errno or -1, "check the path and the disk, then try again")
    if command in RESUMABLE and exc.errno in SPACE:
        resume = "resume with `reglm train --resume RUN`"
        fix = fix.replace("run the command again", resume).replace("try again", resume)
    return f"{where}{reason}; {fix}"


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """SIGINT/SIGTERM held back while the block runs: the list it yields gets the signal numbers
    that arrived. A second signal exits at once, without unwinding. (A KeyboardInterrupt raised
    while a C extension initializes leaves it half-imported: a later ImportError, or a silently
    swallowed interrupt.)"""
    arrived: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if arrived:
            sys.stderr.write("reglm: aborted\n")
            os._exit(EXIT_INTERRUPTED)
        arrived.append(signum)

    with handling_signals(handler):
        yield arrived


LIGHT_COMMANDS = ("presets", "config")
"""Commands that never import PyTorch."""
TRAINING_COMMANDS = ("train", "train-discriminator", "finetune", "study", "reproduce")
"""Commands that train, and import the trainer up front; the others load models only."""


def _report(line: str, exc: BaseException | None = None) -> None:
    """Print ``line`` on standard error -- under torchrun (``WORLD_SIZE`` > 1) on rank 0 only,
    which speaks for the run (an error of another rank reaches it, :mod:`reglm.train.distributed`),
    unless ``exc`` is one the rank met on its own (``every_rank``: a rendezvous it cannot reach,
    the other processes lost). The environment is read here, not torch.distributed: the
    message may come before the process group exists, or after it is gone."""
    if (
        getattr(exc, "every_rank", False)
        or os.environ.get("WORLD_SIZE", "1") in ("", "1")
        or os.environ.get("RANK", "0") == "0"
    ):
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # a file-size limit (ulimit -f) makes a write fail with EFBIG, which reglm reports, rather
    # than kill the process (Python's own start-up ignores SIGXFSZ too; an embedding may not)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        # Ctrl-C while the parser is built (it reads the installed packages' metadata) exits
        # like one during the heavy imports below: one line, status 130, no traceback.
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
    except KeyboardInterrupt:
        print("reglm: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if extra:
        # KEY=VALUE overrides given after an option of a command with a positional RUN
        # (`reglm finetune RUN --out D train.lr=1`): argparse leaves them unparsed.
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command not in LIGHT_COMMANDS:
        with _signals_deferred() as arrived:
            # PyTorch and the rest of the heavy imports: the trainer's, or a model directory's
            importlib.import_module("reglm.train.run" if args.command in TRAINING_COMMANDS else "reglm.modeldir")
        if arrived:
            if argv is None:
                _ignore_signals()
            print("reglm: aborted", file=sys.stderr)
            return EXIT_INTERRUPTED
    previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    finally:
        if argv is None:
            _ignore_signals()
        else:
            # called in-process with its arguments, not as the reglm program: give the handlers back
            for signum, old in previous.items():
                signal.signal(signum, old)


def _ignore_signals() -> None:
    """The reglm program has its exit status: SIGINT/SIGTERM are ignored while the interpreter
    shuts down (Python puts back the default handlers there, and a signal during the slow unload
    of PyTorch would end the process with 143 instead of the status decided)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _abort_on_signals() -> None:
    signal.signal(signal.SIGINT, _abort)
    signal.signal(signal.SIGTERM, _abort)


def _interrupt(signum: int, _frame: Any) -> None:
    """SIGINT/SIGTERM while a command runs (and no handler of its own is installed, as
    ``train``'s, :func:`~reglm.cli.train.stop_on_signals`): unwind as Ctrl-C does, and abort at
    once on another signal."""
    _abort_on_signals()
    raise KeyboardInterrupt


def _abort(signum: int, _frame: Any) -> None:
    """A signal that arrives while the command is already stopping: exit at once, status 130."""
    os.write(2, b"reglm: aborted\n")
    os._exit(EXIT_INTERRUPTED)


def _run(args: argparse.Namespace) -> int:
    """Run the command; its errors become one line and the exit status. Once the command is over
    (returned or raising), a signal aborts at once rather than interrupting the report."""
    try:
        try:
            if args.command not in LIGHT_COMMANDS:
                set_threads(args.threads)
            return args.func(args)
        finally:
            _abort_on_signals()
    except TrainingDiverged as exc:
        _report(f"reglm: error: {exc}", exc)
        return EXIT_DIVERGED
    except ReglmError as exc:
        _report(f"reglm: error: {exc}", exc)
        return EXIT_USAGE
    except BrokenPipeError:
        # the reader of stdout left (`reglm eval ... | head`): stop quietly, as a Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        _report(f"reglm: error: {os_error_message(exc, args.command)}", exc)
        return EXIT_USAGE
    except TrainingInterrupted as exc:
        _report(f"reglm: {exc}", exc)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:
        _report("reglm: aborted", exc)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
