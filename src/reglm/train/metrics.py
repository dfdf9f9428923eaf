"""``metrics.jsonl``: one JSON object per line, appended and flushed as training goes.

Plots and summaries are made from this file after the fact, never during training. On resume
the file is cut back to its size at the checkpoint, so lines written after the checkpoint by an
interrupted process do not appear twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)

    def log(self, **record: Any) -> None:
        record = {"time": round(time.time(), 3), **record}
        line = json.dumps(record, sort_keys=False, allow_nan=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def truncate(self, size: int) -> None:
        """Cut the file back to ``size`` bytes (create it empty when ``size`` is 0)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as fh:
            fh.truncate(size)


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
