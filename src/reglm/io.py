"""Atomic file writes and the run-directory environment record.

Every file reglm writes goes to a temporary file in the same directory first and is then
renamed over the target (``os.replace`` is atomic on POSIX), so a crash or ``kill -9`` leaves
either the old file or the new one, never a torn one. A write that fails (a full disk, a
permission error) removes its temporary file, leaves the target as it was and raises the
``OSError`` itself, with the path, so that the command line can say what to fix.

Writers get a binary file object, never a path: ``torch.save`` and safetensors report a full
disk as a ``RuntimeError`` of their own when they open the path themselves, while a write
through a Python file raises ``OSError(ENOSPC)``. Files are created with the usual
``0666 & ~umask`` permissions.

A short write is an error, never a file: the operating system may write fewer bytes than asked
(a disk that fills up, a file-size limit -- Python ignores ``SIGXFSZ``, so ``ulimit -f`` makes
``write`` return short, then fail with ``EFBIG``). Every write is repeated until all its bytes are
down, so the failure surfaces as an ``OSError``, and before the rename the file's size on disk is
compared with the bytes written (:class:`ShortWrite` when they differ). Readers that must be
sure of what is on disk (``reglm export`` checks the file it wrote) read it back.

Outputs never replace their own inputs: :func:`refuse_same_file` refuses a target that is one of
the command's input files, under any name (a symbolic or a hard link).
"""

from __future__ import annotations

import errno
import io
import json
import os
import platform
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

_TEMP = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ShortWrite(OSError):
    """A file that holds fewer bytes than were written to it."""


class _CheckedWriter(io.RawIOBase):
    """A file wrapper that writes every byte it is given (repeating a short write until the
    operating system raises), counts them, and remembers the ``OSError`` a write raised, for
    writers (``torch.save``) that turn it into an exception of their own."""

    def __init__(self, fh: IO[bytes]) -> None:
        super().__init__()
        self.fh = fh
        self.written = 0
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):
                n = self.fh.write(view[done:])
                if not n:
                    raise ShortWrite(errno.EIO, "the operating system wrote nothing and reported no error")
                done += n
        except OSError as exc:
            self.error = exc
            raise
        self.written += done
        return done


@contextmanager
def atomic_file(target: Path) -> Iterator[IO[bytes]]:
    """Yield a binary file object for a temporary file beside ``target``; on success check that
    the file holds every byte written, fsync it and rename it over ``target``. On failure the
    temporary file is removed, ``target`` is left as it was, and an ``OSError`` raised by a write
    is re-raised with ``target`` as its file name."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_sibling(target)
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    writer: _CheckedWriter | None = None
    try:
        with os.fdopen(fd, "wb", buffering=0) as raw:
            writer = _CheckedWriter(raw)
            try:
                yield writer
            except Exception:
                if writer.error is not None:
                    raise _with_path(writer.error, target) from None
                raise
            os.fsync(raw.fileno())
            size = os.fstat(raw.fileno()).st_size
            if size != writer.written:
                raise ShortWrite(errno.EIO, f"only {size:,} of {writer.written:,} bytes reached the disk")
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except OSError as exc:
        raise _with_path(exc, target) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _with_path(exc: OSError, target: Path) -> OSError:
    """``exc`` naming ``target`` (a temporary file's name means nothing to the user)."""
    kind = ShortWrite if isinstance(exc, ShortWrite) else OSError
    return kind(exc.errno, exc.strerror or str(exc), str(target))


def temp_sibling(path: Path) -> Path:
    """A fresh hidden name next to ``path`` (same directory, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def remove_temp_files(directory: Path) -> list[Path]:
    """Delete the temporary files :func:`temp_sibling` names that a killed process left in
    ``directory`` (not below it); returns them. Call it only while no other process writes there."""
    removed = []
    if directory.is_dir():
        for path in directory.iterdir():
            if _TEMP.match(path.name) and path.is_file():
                path.unlink()
                removed.append(path)
    return removed


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_file(target) as fh:
        fh.write(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_with(target: Path, writer: Callable[[IO[bytes]], None]) -> None:
    """Atomically write ``target`` with ``writer(file_object)`` (e.g. ``torch.save``)."""
    with atomic_file(target) as fh:
        writer(fh)


JSON_BYTES = 64 << 20
"""The largest JSON file reglm parses (the vocabulary of an encoded corpus is the largest it writes)."""
JSON_DEPTH = 32
"""The deepest nesting of arrays and objects accepted in a JSON file (reglm's own nest a few levels)."""


def read_json(path: Path, fix: str, max_bytes: int = JSON_BYTES, max_depth: int = JSON_DEPTH) -> Any:
    """The JSON value in ``path``, parsed within bounds: a file over ``max_bytes``, not UTF-8 JSON,
    or nested deeper than ``max_depth`` is a ReglmError naming it and ending with ``fix``.
    A file that cannot be opened raises its ``OSError``."""
    from reglm.errors import ReglmError

    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ReglmError(f"{path} is larger than {max_bytes:,} bytes, more than a reglm JSON file holds; {fix}")
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ReglmError(f"{path} nests deeper than {max_depth} levels; {fix}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ReglmError(f"{path} is not valid JSON ({str(exc)[:160]}); {fix}") from None
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth >= max_depth:
                raise ReglmError(f"{path} nests deeper than {max_depth} levels; {fix}")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def git_commit() -> str | None:
    """The commit of the reglm source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and commit: what a run directory records as evidence of what ran."""
    from reglm import __version__

    info: dict[str, Any] = {
        "reglm": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "argv": sys.argv,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
