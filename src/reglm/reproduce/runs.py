"""The output directory of a reproduction (its manifest and ledger) and the training of its runs,
each an ordinary run directory, within the time budget."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from reglm.config import load_config_file
from reglm.errors import ReglmError, TrainingInterrupted
from reglm.io import write_json
from reglm.reproduce.plan import MANIFEST, Budget, Run, config_key
from reglm.rundir import CONFIG_FILE, RESULTS_FILE, is_run

# ---------------------------------------------------------------------- the output directory


def new_manifest(paper: str, table: str, scale: str, budget: Budget, options: list[str]) -> dict[str, Any]:
    return {"table": f"{paper}:{table}", "scale": scale, "budget": budget.as_dict(), "options": options}


def claim_out(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Check ``out`` for ``manifest`` (new, empty, or started for the same table and settings) and
    record it; returns the ledger of the runs' seconds of training."""
    out = Path(out)
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file; give a directory for the table's runs")
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReglmError(f"{path} cannot be read ({exc}); give another --out") from None
        if saved.get("table") != manifest["table"]:
            raise ReglmError(
                f"--out {out} holds the runs of {saved.get('table')}, not {manifest['table']}; give another --out"
            )
        changed = [key for key in ("scale", "budget", "options") if saved.get(key) != manifest[key]]
        if changed:
            shown = "; ".join(
                f"{key}: {_setting(key, saved.get(key))}, now {_setting(key, manifest[key])}" for key in changed
            )
            raise ReglmError(
                f"--out {out} holds runs of {manifest['table']} made with other settings ({shown}); rerun with "
                "those settings to resume it, or give another --out"
            )
        return saved.get("ledger", {})
    if out.is_dir() and any(out.iterdir()):
        raise ReglmError(
            f"--out {out} is not empty and holds no `reglm reproduce` table ({MANIFEST}); give a new or empty directory"
        )
    write_json(path, {**manifest, "ledger": {}})
    return {}


def _setting(key: str, value: Any) -> str:
    if key == "budget" and isinstance(value, dict):
        return (
            f"--budget {value['epochs']}"
            if value.get("epochs")
            else f"--minutes {value['minutes']:g}"
            if value.get("minutes")
            else "no budget"
        )
    if key == "options":
        return " ".join(value) if value else "no data or device options"
    return str(value)


def save_ledger(out: Path, manifest: dict[str, Any], ledger: dict[str, Any]) -> None:
    write_json(Path(out) / MANIFEST, {**manifest, "ledger": ledger})


# ---------------------------------------------------------------------- training


class _Deadline:
    """A stop request for the trainer (:class:`~reglm.train.trainer.StopRequest`'s interface): the
    user's (SIGINT/SIGTERM), or the end of a time budget, which reads as SIGALRM."""

    def __init__(self, user: Any, seconds: float | None) -> None:
        self.user = user
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self._signum: int | None = None

    @property
    def signum(self) -> int | None:
        if self._signum is None:
            if self.user is not None and self.user.signum is not None:
                self._signum = self.user.signum
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                self._signum = signal.SIGALRM
        return self._signum

    def request(self, signum: int) -> None:
        self._signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def immediate(self) -> bool:
        """The user's request's: whether a signal now interrupts at once (a run's final evaluation)."""
        return self.user is not None and self.user.immediate

    @immediate.setter
    def immediate(self, value: bool) -> None:
        if self.user is not None:
            self.user.immediate = value

    @property
    def by_user(self) -> bool:
        return self.user is not None and self.user.signum is not None


def say(text: str) -> None:
    print(f"reproduce: {text}", file=sys.stderr, flush=True)


def train_runs(
    runs: list[Run], budget: Budget, ledger: dict[str, Any], save: Any, stop: Any = None, progress: bool = False
) -> None:
    """Train every run that is not finished: start it, or resume it; a run whose time budget
    is spent, or that starts from a run without a model, is left as it is."""
    from reglm.progress import clock
    from reglm.train.run import resume, train

    share = None if budget.minutes is None else budget.minutes * 60 / len(runs)
    for i, run in enumerate(runs, 1):
        entry = ledger.setdefault(run.name, {"seconds": 0.0, "status": "planned"})
        if is_run(run.directory) and config_key(load_config_file(run.directory / CONFIG_FILE)) != run.key:
            raise ReglmError(
                f"{run.directory} was trained with another configuration than the preset {run.name} now gives (was "
                "it edited?); give another --out"
            )
        if (run.directory / RESULTS_FILE).is_file() or entry["status"] == "budget":
            entry["status"] = "done" if (run.directory / RESULTS_FILE).is_file() else entry["status"]
            say(f"run {i}/{len(runs)} {run.name}: {entry['status']}, skipped")
            continue
        missing = [need.name for need in run.needs if not (need.directory / "best").is_dir()]
        if missing:
            entry["status"] = "blocked"
            say(
                f"run {i}/{len(runs)} {run.name}: not started, {', '.join(missing)} has no trained model (its time "
                "budget ended before its first epoch)"
            )
            continue
        left = None if share is None else share - entry["seconds"]
        if left is not None and left <= 0:
            entry["status"] = "budget"
            say(f"run {i}/{len(runs)} {run.name}: its {share / 60:.2g} minute(s) are spent")
            continue
        deadline = _Deadline(stop, left)
        spent = [ledger.get(r.name, {}).get("seconds", 0.0) for r in runs[i - 1 :]]
        table_left = None if share is None else sum(max(share - seconds, 0.0) for seconds in spent)
        say(
            f"run {i}/{len(runs)} {run.name}: {'resuming' if is_run(run.directory) else 'training'}"
            + (
                ""
                if left is None or table_left is None
                else f", {left / 60:.1f} min left; the table's training ends within {table_left / 60:.1f} min "
                f"(ETA {clock(table_left)})"
            )
        )
        started = time.monotonic()
        try:
            if is_run(run.directory):
                resume(run.directory, progress, deadline)
            else:
                train(run.config, run.directory, progress, deadline)
            entry["status"] = "done"
        except TrainingInterrupted:
            if deadline.by_user:
                raise
            entry["status"] = "budget"
            say(f"run {run.name}: its {share / 60:.2g} minute(s) are spent; its best model so far is scored")
        finally:
            entry["seconds"] += time.monotonic() - started
            save()
