"""What an engineer following the README meets: progress lines without a terminal, the thread
count, a run evaluated before its first epoch ends or on a slice, a signal during the final
evaluation, readable tables and help texts."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

import reglm.progress
from reglm.cli import build_parser, main
from reglm.cli.common import DEFAULT_THREADS, print_table, set_threads
from reglm.config.aliases import ALIASES
from reglm.errors import ReglmError

TINY = ["--preset", "tiny", "train.epochs=1", "train.finetune=false", "data.synthetic_sentences=200"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engineer") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_the_pace_prints_after_the_first_steps_and_then_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reglm.progress, "INTERVAL", 0.2)
    pace = reglm.progress.Pace()
    assert not pace.due(1) and not pace.due(2)
    assert not pace.due(3, lambda: 0.1), "a loop about to end prints no early line"
    pace = reglm.progress.Pace()
    assert pace.due(3, lambda: 100.0) and not pace.due(4)
    time.sleep(0.25)
    assert pace.due(5) and not pace.due(6)
    assert reglm.progress.clock(3725.4) == "1:02:05" and reglm.progress.clock(float("inf")) == "?"
    assert pace.eta(0.5) == pytest.approx(pace.elapsed(), rel=0.01)


def test_commands_report_progress_without_a_terminal(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(reglm.progress, "INTERVAL", 0.0)
    assert main(["train", *TINY, "--out", str(tmp_path / "again")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"\| main \| epoch +1 \| step +\d+ .* run ETA \d+:\d\d:\d\d", err), err[-2000:]
    final = r"^test: \d+/\d+ batch \(\d+%\) \| [\d.,]+ batch/s \| ETA \d+:\d\d:\d\d \(this pass\)$"
    assert re.search(final, err, re.M), "the final test pass reports too"
    assert main(["eval", str(run), "--dynamic", "variant=sgd,lr=0.1,segment=20"]) == 0
    err = capsys.readouterr().err
    lines = re.findall(r"^valid \(dynamic\): (\d+)/(\d+) segment .* \| command (\d+)% \| ETA \d+:\d\d:\d\d$", err, re.M)
    assert lines and lines[-1][0] == lines[-1][1] and lines[-1][2] == "100", "the whole command's share and ETA"
    assert main(["eval", str(run), "--cache", "window=20", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["mode"] == "cache"
    assert re.search(r"^valid: \d+/\d+ batch .* \| command \d+% \| ETA", err, re.M)


def test_a_run_asked_for_progress_prints_lines_not_a_bar_without_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The studies and reproduce ask their runs for progress; into a log file that is lines (a tqdm
    bar there would be a stream of carriage returns)."""
    from reglm.config import build_config
    from reglm.train.run import train

    monkeypatch.setattr(reglm.progress, "INTERVAL", 0.0)
    train(build_config("tiny", TINY[2:]), tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(r"\| main \| epoch +1 \| step +\d+ .* run ETA", err), err[-2000:]


def test_the_thread_count_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(None) == DEFAULT_THREADS == torch.get_num_threads()
        assert set_threads(2) == 2 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert set_threads(None) == 2, "OMP_NUM_THREADS is respected"
        with pytest.raises(ReglmError, match="--threads 0"):
            set_threads(0)
        assert build_parser().parse_args(["eval", "RUN", "--threads", "3"]).threads == 3
    finally:
        torch.set_num_threads(before)


def test_an_unfinished_run_and_a_slice_can_be_evaluated(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    early = tmp_path / "early"
    assert main(["train", *TINY, "--out", str(early), "train.max_steps=3", "train.epochs=5"]) == 0
    capsys.readouterr()
    for name in ("best", "last"):
        for path in (early / name).iterdir():
            path.unlink()
        (early / name).rmdir()
    assert main(["eval", str(early)]) == 2
    assert "--checkpoint state" in capsys.readouterr().err
    assert main(["eval", str(early), "--checkpoint", "state", "--json"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["checkpoint"].endswith("state.pt") and math_finite(state["ppl"])
    assert main(["eval", str(run), "--max-tokens", "101", "--batch-size", "1", "--json"]) == 0
    sliced = json.loads(capsys.readouterr().out)
    assert sliced["tokens"] == 100 and sliced["max_tokens"] == 101
    assert main(["eval", str(run), "--max-tokens", "1"]) == 2
    assert "--max-tokens 1 must be >= 2" in capsys.readouterr().err


def math_finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


def test_a_signal_during_the_final_evaluation_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import reglm.train.results as results

    real = results.evaluate

    def signalled(*args: object, **kwargs: object) -> object:
        if kwargs.get("desc") == "test":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("the signal did not stop the final evaluation")
        return real(*args, **kwargs)

    monkeypatch.setattr(results, "evaluate", signalled)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted during the final evaluation; the run is complete" in err
    assert f"reglm eval {out} --split test" in err
    written = json.loads((out / "results.json").read_text())
    assert "ppl" in written["valid"] and "test" not in written and written["missing"]["splits"] == ["test"]
    monkeypatch.setattr(results, "evaluate", real)
    assert main(["train", "--resume", str(out)]) == 0
    assert "ppl" in json.loads((out / "results.json").read_text())["test"], "resuming the complete run scores it"


def test_tables_and_help_read_well(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"label": "a", "x": 1.5, "y": None}, {"label": "b", "x": float("nan"), "y": 2.0}]
    print_table(rows, [(" x", "x", ".2f"), ("   y", "y", ".3f")])
    table = capsys.readouterr().out
    assert "nan" not in table and table.splitlines()[1].split() == ["a", "1.50", "-"]
    assert main(["data", "info", "synthetic"]) == 0
    info = capsys.readouterr().out
    assert "{" not in info and re.search(r"^train +880,000 +0\.00%$", info, re.M)
    assert "vocabulary  1,001 words, no <unk>" in info
    assert main(["data", "info", "synthetic", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]["train"] == 880000
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    names = ("train", "train-discriminator", "finetune")
    helps = " ".join(action.help or "" for name in names for action in commands[name]._actions)
    examples = re.findall(r"\b((?:model|train|data)\.[a-z_.]+)=", helps)
    assert examples and not [name for name in examples if name in ALIASES], "help shows current option names"
