"""``reglm reproduce`` end to end on the toolkit's smoke table (two tiny rows): it trains, resumes
after an interrupt without retraining the finished row, writes table.md and table.json with the
paper's and reglm's columns, and refuses bad input with exit status 2."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from reglm.cli import main
from reglm.config import load_config_file
from reglm.config.presets import Reported, TableRow
from reglm.errors import TrainingInterrupted
from reglm.reproduce import Budget, RowPlan, Run, Scorer, reproduce
from reglm.train.trainer import StopRequest

COLUMNS = (
    "| row | paper valid | paper test | reglm valid | reglm test | paper params | reglm params (full / "
    "trained) | evaluated | epochs (main+ft) | minutes | device |"
)


class StopWhen(StopRequest):
    """A stop request that a condition raises, as SIGINT would, at the end of a step."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self.condition = condition
        self.raised: int | None = None

    @property  # type: ignore[override]
    def signum(self) -> int | None:
        if self.raised is None and self.condition():
            self.raised = signal.SIGINT
        return self.raised

    @signum.setter
    def signum(self, value: int | None) -> None:
        self.raised = value


def test_reproduce_resumes_without_retraining_and_writes_both_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smoke"
    second = out / "runs" / "smoke-vd"
    with pytest.raises(TrainingInterrupted):
        reproduce("reglm:smoke", out, stop=StopWhen(lambda: (second / "state.pt").is_file()))
    finished = out / "runs" / "smoke-awd" / "results.json"
    stamp = finished.stat().st_mtime_ns
    assert not (second / "results.json").exists() and (second / "state.pt").is_file()
    capsys.readouterr()

    assert main(["reproduce", "reglm:smoke", "--out", str(out)]) == 0
    printed, log = capsys.readouterr()
    assert (
        finished.stat().st_mtime_ns == stamp
        and "run 1/2 smoke-awd: done, skipped" in log
        and "run 2/2 smoke-vd: resuming" in log
    )
    assert len(json.loads((second / "environment.json").read_text())) == 2  # started, then resumed
    results = json.loads(finished.read_text())
    assert results["main"]["test"]["ppl"] > 1 and results["main"]["best_epoch"] in (
        1,
        2,
    )  # stage 1 scored before fine-tuning

    markdown = (out / "table.md").read_text()
    assert markdown == printed and COLUMNS in markdown
    lines = [line for line in markdown.splitlines() if line.startswith("| tiny")]
    assert len(lines) == 2 and all(len(line.split("|")) == len(COLUMNS.split("|")) for line in lines)
    table = json.loads((out / "table.json").read_text())
    assert table["table"] == "reglm:smoke" and [record["id"] for record in table["records"]] == ["awd", "vd"]
    awd, vd = table["records"]
    assert (
        awd["reglm"]["test"] == pytest.approx(results["test"]["ppl"])
        and awd["reglm"]["params"] == awd["reglm"]["params_full_scale"]
    )
    assert awd["budget"]["epochs"] == {"main": 2, "finetune": 1} and vd["budget"]["epochs"] == {
        "main": 2,
        "finetune": 0,
    }
    assert awd["budget"]["device"].startswith("cpu") and awd["paper"] == {
        "valid": None,
        "test": None,
        "params": None,
        "params_count": None,
    }

    run = Run("smoke-awd", load_config_file(finished.parent / "config.json"), finished.parent)
    for evaluation, spec in (
        ("cache", "window=20,theta=0.5,lambda=0.1"),
        ("dynamic-search", "lr=1e-4,3e-4;lambda=0.002;max_train_tokens=500"),
    ):
        row = TableRow("smoke-awd", "reglm", "smoke", "awd", "tiny", Reported(), evaluation, spec)
        scores = Scorer().score(RowPlan(row, run, "final"))
        assert (
            1 < scores["valid"] < 2 * awd["reglm"]["valid"]
            and 1 < scores["test"]
            and scores["setting"]
            and scores["params"] == awd["reglm"]["params"]
        )

    for argv, fragment in (
        (["reproduce", "nobody:1"], "unknown paper 'nobody'"),
        (["reproduce", "inan:9"], "inan has no table '9'"),
        (["reproduce", "reglm:smoke", "--rows", "gpt"], "has no row 'gpt'"),
        (["reproduce", "popov:1", "--rows", "initial"], "leave out --rows"),
        (["reproduce", "popov:1", "--minutes", "5"], "--budget EPOCHS instead of --minutes"),
        (["reproduce", "popov:1"], f"--out {out} holds the runs of reglm:smoke, not popov:1"),
        (["reproduce", "merity:3"], "--cache-deltas"),
        (["reproduce", "inan:1", "--rows", "ptb-small-vd"], f"--out {out} holds the runs of reglm:smoke, not inan:1"),
        (["reproduce", "reglm:smoke", "--budget", "1"], "made with other settings"),
    ):
        assert main([*argv, "--out", str(out)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("reglm: error: ") and fragment in error and "Traceback" not in error


def test_a_spent_time_budget_stops_the_runs_and_says_so(tmp_path: Path) -> None:
    out = tmp_path / "minutes"
    table = reproduce("reglm:smoke", out, budget=Budget(minutes=1e-6)).table
    for record in table["records"]:
        assert record["budget"]["status"] == "budget" and record["reglm"]["missing"].startswith("no trained model")
        assert (out / "runs" / record["run"] / "state.pt").is_file() and not (
            out / "runs" / record["run"] / "results.json"
        ).exists()
    assert "--minutes 1e-06" in (out / "table.md").read_text()
    again = reproduce("reglm:smoke", out, budget=Budget(minutes=1e-6)).table
    assert [r["budget"]["minutes"] for r in again["records"]] == [
        r["budget"]["minutes"] for r in table["records"]
    ]  # nothing trained again


def test_a_row_that_starts_from_earlier_runs_counts_their_minutes_and_names_their_scores(tmp_path: Path) -> None:
    from reglm.config import build_config
    from reglm.reproduce import render_markdown, row_record

    def run_dir(name: str, valid: float | None, epochs: int) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "metrics.jsonl").write_text(
            "".join(json.dumps({"event": "epoch", "stage": "main"}) + "\n" for _ in range(epochs))
        )
        if valid is not None:
            (directory / "results.json").write_text(json.dumps({"valid": {"ppl": valid}, "test": {"ppl": valid - 1}}))
        return directory

    config = build_config("tiny")
    base = Run("base", config, run_dir("base", 120.0, 3))
    middle = Run("middle", config, run_dir("middle", None, 2), needs=(base,))
    last = Run("last", config, run_dir("last", 100.0, 1), needs=(middle, base))  # base reached twice: counted once
    ledger = {"base": {"seconds": 600.0}, "middle": {"seconds": 120.0}, "last": {"seconds": 60.0, "status": "done"}}
    row = TableRow("last", "reglm", "smoke", "chained", "tiny", Reported(), "plain", None)
    record = row_record(RowPlan(row, last, "final"), {"valid": 100.0, "test": 99.0}, ledger)

    budget = record["budget"]
    assert [item["run"] for item in budget["earlier_runs"]] == ["base", "middle"]
    assert budget["minutes"] == 1.0 and budget["minutes_with_earlier_runs"] == 13.0
    assert budget["earlier_runs"][0] == {
        "run": "base",
        "epochs": {"main": 3, "finetune": 0},
        "minutes": 10.0,
        "valid": 120.0,
        "test": 119.0,
    }
    assert budget["earlier_runs"][1]["valid"] is None
    markdown = render_markdown(
        {
            "table": "reglm:smoke",
            "command": "reglm reproduce reglm:smoke",
            "scale": "full",
            "budget": {"epochs": None, "minutes": None},
            "minutes": 13.0,
            "runs": 3,
            "devices": ["cpu"],
        },
        [record],
    )
    assert "| 13.0 |" in markdown
    assert "`base` (3+0 epochs, 10.0 min, valid 120.00 / test 119.00); `middle` (2+0 epochs, 2.0 min)" in markdown


def test_a_table_with_no_row_scored_exits_with_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "nothing"
    assert main(["reproduce", "reglm:smoke", "--minutes", "1e-6", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "reglm: error: no row of reglm:smoke was scored" in error and "larger --minutes" in error
    assert "Traceback" not in error
    assert (out / "table.md").is_file(), "the table is still written"
