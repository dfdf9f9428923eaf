"""The training loop end to end: stages, files, exact resume after SIGINT / kill -9, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reglm.config import build_config
from reglm.data import load_corpus
from reglm.errors import ReglmError
from reglm.metrics import read_metrics
from reglm.train.checkpoint import load_state
from reglm.train.run import Trainer, TrainingDiverged, resume, train

RESUME_OVERRIDES = [
    "data.synthetic_sentences=2400",
    "train.epochs=3",
    "train.finetune_epochs=1",
    "train.checkpoint_interval=40",
    "train.log_interval=50",
]


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("runs") / "tiny"
    results = train(build_config("tiny"), run, progress=False)
    return run, results


def test_run_directory_holds_everything(tiny_run: tuple[Path, dict]) -> None:
    run, results = tiny_run
    for name in ("config.json", "vocab.txt", "metrics.jsonl", "environment.json", "state.pt", "results.json"):
        assert (run / name).is_file(), name
    for sub in ("best", "last"):
        for name in ("model.safetensors", "config.json", "vocab.txt"):
            assert (run / sub / name).is_file(), f"{sub}/{name}"
    env = json.loads((run / "environment.json").read_text())
    assert env[0]["torch"] == torch.__version__ and "device" in env[0]
    assert not list(run.rglob("*.tmp")), "temporary files left behind"


def test_stages_and_metrics(tiny_run: tuple[Path, dict]) -> None:
    run, results = tiny_run
    records = read_metrics(run / "metrics.jsonl")
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["stage"] for r in epochs][:3] == ["main"] * 3
    finetune = [r for r in epochs if r["stage"] == "finetune"]
    assert 1 <= len(finetune) <= 2
    assert all(r["averaging"] for r in finetune), "fine-tuning is ASGD from T=0"
    best = min(r["valid_loss"] for r in epochs)
    assert results["valid"]["loss"] == pytest.approx(best, rel=1e-6)
    assert records[-1]["event"] == "final"
    state = load_state(run / "state.pt")
    assert state["stage"] == "done"


def test_synthetic_results_report_the_true_perplexity(tiny_run: tuple[Path, dict]) -> None:
    _, results = tiny_run
    syn = results["synthetic"]
    assert syn["words"] > 0
    assert syn["true_word_ppl"] < syn["model_word_ppl"], "no model beats the true distribution on average"
    assert 10 < syn["true_word_ppl"] < 1000


def test_refuses_to_overwrite_a_run(tiny_run: tuple[Path, dict]) -> None:
    run, _ = tiny_run
    before = (run / "state.pt").read_bytes()
    with pytest.raises(ReglmError, match="already holds a run"):
        train(build_config("tiny"), run, progress=False)
    assert (run / "state.pt").read_bytes() == before


def _spawn(
    run: Path, extra: list[str], preset: str = "tiny", overrides: list[str] = RESUME_OVERRIDES
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "reglm", "train", "--preset", preset, "--out", str(run), *overrides, *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )


def _wait_for_checkpoint(proc: subprocess.Popen, path: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    train(build_config("tiny", RESUME_OVERRIDES), run, progress=False)
    return run


def _interrupt_and_resume(
    run: Path, reference: Path, how: str, preset: str = "tiny", overrides: list[str] = RESUME_OVERRIDES
) -> None:
    proc = _spawn(run, [], preset, overrides)
    _wait_for_checkpoint(proc, run / "state.pt")
    sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "kill9": signal.SIGKILL}[how]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if how == "kill9":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130, err.decode()
        assert b"Resume with" in err
    state = load_state(run / "state.pt")
    assert state["stage"] != "done", "the interruption came too late to test anything"
    resume(run, progress=False)
    for sub in ("best", "last"):
        _assert_same_weights(reference / sub, run / sub)
    ref_state, new_state = load_state(reference / "state.pt"), load_state(run / "state.pt")
    for key, value in ref_state["model"].items():
        assert torch.equal(value, new_state["model"][key]), key
    ref_epochs = [r["valid_loss"] for r in read_metrics(reference / "metrics.jsonl") if r["event"] == "epoch"]
    new_epochs = [r["valid_loss"] for r in read_metrics(run / "metrics.jsonl") if r["event"] == "epoch"]
    assert new_epochs == ref_epochs, "metrics.jsonl must hold each epoch once, with the same numbers"


@pytest.mark.parametrize("how", ["sigint", "sigterm", "kill9"])
def test_resume_is_bit_exact(tmp_path: Path, reference_run: Path, how: str) -> None:
    _interrupt_and_resume(tmp_path / "run", reference_run, how)


def test_resume_is_bit_exact_with_advsoft_and_input_noise(tmp_path: Path) -> None:
    """The noise draws come from the saved RNG state, and the schedule from the saved epoch."""
    reference = tmp_path / "reference"
    train(build_config("advsoft-tiny", RESUME_OVERRIDES), reference, progress=False)
    _interrupt_and_resume(tmp_path / "run", reference, "sigint", "advsoft-tiny")


def test_non_finite_loss_stops_without_touching_checkpoints(tmp_path: Path) -> None:
    config = build_config("tiny", ["train.epochs=2", "train.finetune=false"])
    corpus = load_corpus(config)
    trainer = Trainer(config, tmp_path / "run", corpus, progress=False)
    trainer.start()
    trainer._train_epoch()
    trainer._end_epoch()
    best = (tmp_path / "run" / "best" / "model.safetensors").read_bytes()
    state = (tmp_path / "run" / "state.pt").read_bytes()
    with torch.no_grad():
        trainer.model.embedding.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"step \d+.*Last good checkpoint: .*state.pt"):
        trainer.run()
    assert (tmp_path / "run" / "best" / "model.safetensors").read_bytes() == best
    assert (tmp_path / "run" / "state.pt").read_bytes() == state


def test_finetune_lr_applies_to_the_finetune_stage_only(tmp_path: Path) -> None:
    config = build_config(
        "tiny",
        ["train.variable_bptt=false", "train.finetune_lr=3.5", "train.log_interval=5", "data.synthetic_sentences=200"],
    )
    train(config, tmp_path / "run", progress=False)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "step"]
    assert {r["lr"] for r in steps if r["stage"] == "main"} == {config.train.optimizer.lr}
    assert {r["lr"] for r in steps if r["stage"] == "finetune"} == {3.5}
