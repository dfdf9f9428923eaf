"""The ``reglm`` command line: one module per command family.

Subcommands: ``train``, ``train-discriminator``, ``finetune`` (:mod:`reglm.cli.train`), ``eval``
(:mod:`reglm.cli.eval`), ``score`` (:mod:`reglm.cli.score`), ``generate``, ``analyze``, ``study``, ``data download|info``,
``presets``, ``config`` (:mod:`reglm.cli.data`). Model and training options are not flags of
their own: any option of the run configuration is set with ``section.option=value`` (``reglm
config`` lists them), applied after ``--preset``. User mistakes and failing operating-system
calls print one line ``reglm: error: ...`` and exit with status 2. Under ``torchrun`` every rank
exits with the same status and rank 0 alone prints (:func:`_report`).
"""

from __future__ import annotations

import argparse
import errno
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

from reglm.cli import analyze, data, eval, export, generate, reproduce, score, study, train
from reglm.cli.common import add_threads_option, handling_signals, set_threads
from reglm.errors import ReglmError, TrainingDiverged, TrainingInterrupted

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
FAMILIES = (train, eval, score, generate, export, analyze, study, data, reproduce)
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
    parser.add_argument("--version", action="version", version=version_line(), help="print the versions of reglm, torch and Python, and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    for name, command in sub.choices.items():
        if name not in LIGHT_COMMANDS:
            add_threads_option(command)
    return parser


FIXES = {
    errno.ENOSPC: "free some disk space (or choose another --out), then resume with `reglm train --resume RUN`",
    errno.EDQUOT: "free some of your disk quota (or choose another --out), then resume with `reglm train --resume RUN`",
    errno.EACCES: "check the permissions of that path, or choose another one",
    errno.EPERM: "check the permissions of that path, or choose another one",
    errno.EROFS: "that file system is read-only; choose a path on a writable one",
    errno.EEXIST: "that path already exists; choose another one",
    errno.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
    errno.EISDIR: "that path is a directory; give a file name",
    errno.ENOENT: "check that the path exists",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the device reported an I/O error; check the disk, then resume",
}
"""What to tell the user for the OS errors a command can meet (writes keep the previous file)."""


def os_error_message(exc: OSError) -> str:
    """``exc`` as one line: the path, what went wrong and the fix."""
    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or str(exc)
    fix = FIXES.get(exc.errno or -1, "check the path and the disk, then try again")
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


def _report(line: str, exc: BaseException | None = None) -> None:
    """Print ``line`` on standard error -- under torchrun (``WORLD_SIZE`` > 1) on rank 0 only,
    which speaks for the run (an error of another rank reaches it, :mod:`reglm.train.distributed`),
    unless ``exc`` is one the rank met on its own (``every_rank``: a rendezvous it cannot reach,
    the other processes lost). The environment is read here, not torch.distributed: the
    message may come before the process group exists, or after it is gone."""
    if getattr(exc, "every_rank", False) or os.environ.get("WORLD_SIZE", "1") in ("", "1") or os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
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
            import reglm.train.run  # noqa: F401  (PyTorch and the rest of the heavy imports)
        if arrived:
            print("reglm: aborted", file=sys.stderr)
            return EXIT_INTERRUPTED
    try:
        if args.command not in LIGHT_COMMANDS:
            set_threads(args.threads)
        return args.func(args)
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
        _report(f"reglm: error: {os_error_message(exc)}", exc)
        return EXIT_USAGE
    except TrainingInterrupted as exc:
        _report(f"reglm: {exc}", exc)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt as exc:
        _report("reglm: aborted", exc)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
