"""What the command line does for its user: corpus paths that survive a change of directory,
progress without a terminal, TensorBoard, the resolved configuration, versions, and plotting
as an optional extra that ``reglm train`` never imports."""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import io
import json
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reglm.cli import main
from reglm.errors import ReglmError
from reglm.metrics import TENSORBOARD_DIR, MetricsLog, read_metrics

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
SMALL = ["train.epochs=1", "train.finetune=false", "train.log_interval=4"]


def _write_corpus(directory: Path) -> None:
    rng = random.Random(0)
    directory.mkdir(parents=True)
    for split, lines in (("train", 160), ("valid", 20), ("test", 20)):
        text = "\n".join(" ".join(rng.choice("abcde") for _ in range(6)) for _ in range(lines))
        (directory / f"{split}.txt").write_text(text + "\n", encoding="utf-8")


class Trained:
    """A tiny run trained from ``work/`` with the relative ``--data corpus``, and its stderr."""

    def __init__(self, work: Path, run: Path, stderr: str):
        self.work, self.run, self.stderr = work, run, stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    work = tmp_path_factory.mktemp("friendly") / "work"
    _write_corpus(work / "corpus")
    before, stderr = os.getcwd(), io.StringIO()
    os.chdir(work)
    try:
        with contextlib.redirect_stderr(stderr):
            code = main(
                [
                    "train",
                    "--preset",
                    "tiny",
                    "--data",
                    "corpus",
                    "--out",
                    "run",
                    *(["--tensorboard"] if HAS_TENSORBOARD else []),
                    *SMALL,
                ]
            )
    finally:
        os.chdir(before)
    assert code == 0, stderr.getvalue()
    yield Trained(work, work / "run", stderr.getvalue())


def test_relative_corpus_is_stored_absolute(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for config in (trained.run / "config.json", trained.run / "best" / "config.json"):
        saved = json.loads(config.read_text())
        name = saved.get("config", saved)["data"]["name"]
        assert name == str(trained.work / "corpus"), config
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(trained.run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_old_relative_corpus_works_from_its_directory_only(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    old = trained.work / "old-run"
    old.mkdir()
    best = old / "best"
    best.mkdir()
    for item in (trained.run / "best").iterdir():
        (best / item.name).write_bytes(item.read_bytes())
    saved = json.loads((best / "config.json").read_text())
    saved["config"]["data"]["name"] = "corpus"  # as runs stored it before
    (best / "config.json").write_text(json.dumps(saved))

    monkeypatch.chdir(trained.work)
    assert main(["eval", str(old), "--json"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(old)]) == 2
    err = capsys.readouterr().err
    assert "'corpus'" in err and "--data" in err and str(tmp_path) in err and "Traceback" not in err
    assert main(["eval", str(old), "--data", str(trained.work / "corpus"), "--json"]) == 0


def test_progress_lines_without_a_terminal(trained: Trained) -> None:
    lines = [line for line in trained.stderr.splitlines() if "of epoch" in line]
    steps = [r for r in read_metrics(trained.run / "metrics.jsonl") if r["event"] == "step"]
    assert len(lines) == len(steps) >= 2, trained.stderr
    assert all("tok/s" in line and "loss" in line and "lr" in line and "run ETA" in line for line in lines)
    assert f"step {steps[0]['step']:7d}" in lines[0] and f"loss {steps[0]['loss']:7.4f}" in lines[0]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'reglm[tensorboard]')")
def test_tensorboard_holds_the_metrics(trained: Trained) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(trained.run / TENSORBOARD_DIR))
    board.Reload()
    records = read_metrics(trained.run / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars("step/loss")] == [
        (r["step"], r["loss"]) for r in steps
    ]
    (epoch,) = [r for r in records if r["event"] == "epoch"]
    assert [e.value for e in board.Scalars("epoch/valid_ppl")] == [pytest.approx(epoch["valid_ppl"], rel=1e-6)]
    assert "final/test_ppl" in board.Tags()["scalars"]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed (pip install 'reglm[tensorboard]')")
def test_tensorboard_after_resume_shows_no_step_twice(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    log.truncate(0)
    for step in (1, 2, 3):
        log.log(event="step", step=step, loss=float(step))
        if step == 2:
            checkpoint = log.size()
    log.close()
    resumed = MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    resumed.truncate(checkpoint, first_step=3)  # as at a checkpoint of step 2
    resumed.log(event="step", step=3, loss=30.0)
    resumed.close()
    board = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    board.Reload()
    assert [(e.step, e.value) for e in board.Scalars("step/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_tensorboard_missing_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, trained: Trained
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ReglmError, match=r"pip install 'reglm\[tensorboard\]'"):
        MetricsLog(tmp_path / "metrics.jsonl", tensorboard=True)
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                str(trained.work / "corpus"),
                "--out",
                str(out),
                "--tensorboard",
                *SMALL,
            ]
        )
        == 2
    )
    assert "reglm[tensorboard]" in capsys.readouterr().err and not out.exists()


class _Blocker(importlib.abc.MetaPathFinder):
    """Refuses, and records, every import of matplotlib."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] == "matplotlib":
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture
def fresh_without_matplotlib() -> Iterator[_Blocker]:
    """reglm imported afresh, with matplotlib as if it were not installed: every import of it,
    at the top of a module or inside a function, is recorded and fails. The modules of before
    are back afterwards."""

    def ours(name: str) -> bool:
        return name.split(".")[0] in ("reglm", "matplotlib")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    blocker = _Blocker()
    sys.meta_path.insert(0, blocker)
    try:
        yield blocker
    finally:
        sys.meta_path.remove(blocker)
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_train_never_imports_matplotlib_and_plots_name_the_extra(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture, fresh_without_matplotlib: _Blocker
) -> None:
    fresh_main = importlib.import_module("reglm.cli").main
    assert (
        fresh_main(
            [
                "train",
                "--preset",
                "tiny",
                "--data",
                str(trained.work / "corpus"),
                "--out",
                str(tmp_path / "run"),
                *SMALL,
            ]
        )
        == 0
    )
    assert fresh_without_matplotlib.attempts == []
    capsys.readouterr()
    assert fresh_main(["analyze", str(trained.run), "--out", str(tmp_path / "analysis")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reglm: error:") and "pip install 'reglm[analysis]'" in err and "Traceback" not in err
    assert not (tmp_path / "analysis").exists(), "refused before any work"
    assert fresh_without_matplotlib.attempts


def test_fine_tuning_legend_only_for_runs_that_fine_tune() -> None:
    from reglm.analysis.plots import embedding_diversity_figure

    def record(finetune_start: int | None) -> dict:
        epochs = [{"global_epoch": i, "train_ppl": 10.0 / i, "valid_ppl": 12.0 / i} for i in (1, 2, 3)]
        return {
            "label": "run",
            "kde": {"grid": [0.0, 1.0], "density": [0.5, 0.5]},
            "singular_values": [1.0, 0.5],
            "epochs": epochs,
            "finetune_start_epoch": finetune_start,
        }

    def legend(records: list[dict]) -> list[str]:
        return [text.get_text() for text in embedding_diversity_figure(records).axes[2].get_legend().get_texts()]

    assert "fine-tuning starts" not in legend([record(None)])
    assert "fine-tuning starts" in legend([record(None), record(3)])


def test_config_shows_a_resolved_preset(capsys: pytest.CaptureFixture) -> None:
    assert main(["config", "--preset", "tiny", "lr=5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "train.optimizer.lr=5.0" in lines and "model.encoder.kind=awd-lstm" in lines and "preset=tiny" in lines
    assert main(["config", "--preset", "tiny", "--json", "lr=5"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["train"]["optimizer"]["lr"] == 5.0 and resolved["preset"] == "tiny"
    assert main(["config", "--preset", "tiny", "train.optimizer.lr=abc"]) == 2
    assert "override train.optimizer.lr=abc" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith("reglm ") and "torch " in out
