"""``metrics.jsonl``: one JSON object per line, appended and flushed as training goes.

Plots and summaries are made from this file after the fact, never during training. On resume
the file is cut back to its size at the checkpoint, so lines written after the checkpoint by an
interrupted process do not appear twice.

With ``train.log.tensorboard=true`` every event is also written as TensorBoard scalars into
``RUN/tensorboard/`` (:class:`TensorBoardLog`), from the same records.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from reglm.errors import ReglmError

TENSORBOARD_DIR = "tensorboard"
"""The run directory's folder of TensorBoard event files."""


class MetricsLog:
    """``metrics.jsonl`` of a run directory, and its TensorBoard copy when ``tensorboard``."""

    def __init__(self, path: Path, tensorboard: bool = False):
        self.path = Path(path)
        self.board = TensorBoardLog(self.path.parent / TENSORBOARD_DIR) if tensorboard else None

    def log(self, **record: Any) -> None:
        record = {"time": round(time.time(), 3), **record}
        line = json.dumps(record, sort_keys=False, allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if self.board is not None:
            self.board.write(record)

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int, first_step: int = 0) -> None:
        """Cut the file back to ``size`` bytes (create it empty when ``size`` is 0); the
        TensorBoard events of ``first_step`` on that an earlier process wrote are dropped too."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            fh.truncate(size)
        if self.board is not None:
            self.board.restart(first_step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class TensorBoardLog:
    """The events of ``metrics.jsonl`` as TensorBoard scalars: every number (a flag as 0 or 1) of
    an event but its ``step``, ``epoch`` and ``time``, tagged ``EVENT/FIELD`` (``step/loss``,
    ``epoch/valid_ppl``, ``final/test_ppl``...), at the event's step and wall time. Each event is
    flushed as it is written. A restarted log (a resumed run) starts with TensorBoard's purge
    marker, so the events an interrupted process wrote after the checkpoint are not shown twice.
    The event file is opened at the first event, so nothing is written before the run directory
    is claimed."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ReglmError(
                "train.log.tensorboard=true (--tensorboard) needs the tensorboard package: pip install "
                "'reglm[tensorboard]', or set train.log.tensorboard=false"
            ) from None
        self.log_dir = log_dir
        self._summary_writer = SummaryWriter
        self.writer: Any = None
        self.purge_step: int | None = None

    def restart(self, first_step: int) -> None:
        self.close()
        self.purge_step = first_step

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            self.writer = self._summary_writer(str(self.log_dir), purge_step=self.purge_step)
            self.purge_step = None
        event = record.get("event", "metrics")
        for key, value in record.items():
            if key not in ("time", "step", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(
                    f"{event}/{key}", float(value), global_step=record.get("step"), walltime=record["time"]
                )
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (a torn last line, from a crash mid-write, is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
