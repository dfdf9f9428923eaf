"""A stateful encoder and an output layer written outside ``src/`` (``tests/toy_components/``, one
file each, registered by one decorator line) pass the registry conformance suite and go through
train -> resume -> eval -> score -> export like the built-in kinds."""

from __future__ import annotations

import importlib
import json
import math
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from reglm.cli import main
from reglm.config import build_config
from reglm.config.kinds import registry
from reglm.encoders.base import StackLayer
from reglm.errors import ReglmError, TrainingInterrupted
from reglm.export import export_model
from reglm.layers.component import register
from reglm.train.checkpoint import load_state
from reglm.train.run import train
from reglm.train.trainer import StopRequest
from tests import test_registries as suite

TOYS = {
    ("encoder", "toy-elman"): ["model.encoder=toy-elman", "model.encoder.hidden_size=12"],
    ("output", "toy-softmax"): ["model.output=toy-softmax"],
}
MODULES = ("tests.toy_components.elman", "tests.toy_components.tempered_softmax")


@pytest.fixture
def toys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The toy components registered (by importing their files) for one test, and removed after."""
    for (family, kind), overrides in TOYS.items():
        monkeypatch.setitem(suite.CONFIGS, (family, kind), overrides)
        monkeypatch.setitem(registry(family), kind, None)
    for name in MODULES:
        importlib.reload(importlib.import_module(name))
    yield


@pytest.mark.parametrize("family, kind", list(TOYS), ids=[kind for _, kind in TOYS])
def test_the_toys_pass_the_conformance_suite(family: str, kind: str, toys: None, tmp_path: Path) -> None:
    suite.test_state_round_trips_through_state_pt(family, kind, tmp_path / "state")
    suite.test_evaluation_scores_every_token_once_at_any_batch_size(family, kind)
    suite.test_export_equals_pytorch_or_is_refused_by_declaration(family, kind, tmp_path / "export")
    suite.test_every_parameter_takes_a_gradient_or_the_model_declares_it_skips(family, kind)


def test_train_resume_eval_score_export(toys: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = [*suite.RUN, *TOYS[("encoder", "toy-elman")], *TOYS[("output", "toy-softmax")]]
    config = build_config("tiny", overrides)
    assert (config.model.encoder.kind, config.model.output.kind) == ("toy-elman", "toy-softmax")
    straight, run = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "--preset", "tiny", "--out", str(straight), *overrides]) == 0
    stop = StopRequest()

    def stop_at_step_3(trainer) -> None:
        if trainer.step == 3:
            stop.request(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(config, run, progress=False, stop=stop, step_hooks=[stop_at_step_3])
    assert load_state(run / "state.pt")["step"] == 3
    assert main(["train", "--resume", str(run)]) == 0
    capsys.readouterr()
    want, got = (load_file(str(d / "last" / "model.safetensors")) for d in (straight, run))
    assert "output.log_temperature" in want and "encoder.layers.0.rnn.weight_hh_l0" in want
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    results = []
    for directory in (straight, run):
        assert main(["eval", str(directory), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["loss"] == results[1]["loss"] and math.isfinite(results[0]["loss"]) and results[0]["tokens"] > 0

    text = tmp_path / "text.txt"
    vocab = [w for w in (straight / "vocab.txt").read_text().split() if not w.isdigit()][5:15]
    text.write_text(" ".join(vocab[:6]) + "\n" + " ".join(vocab[4:]) + "\n")
    assert main(["score", str(straight), str(text), "--out", str(tmp_path / "scores.tsv")]) == 0
    rows = (tmp_path / "scores.tsv").read_text().splitlines()
    assert len(rows) == 3

    assert main(["export", str(straight), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    spec = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert spec["check"]["max_abs_log_prob_diff"] < 1e-4 and spec["stateful"]


def test_a_component_without_an_inference_path_is_refused_by_export(
    toys: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.toy_components.elman import ElmanLayer

    monkeypatch.setattr(ElmanLayer, "export_module", StackLayer.export_module)
    model = suite.model_of("encoder", "toy-elman")
    with pytest.raises(
        ReglmError,
        match="model.encoder.kind=toy-elman cannot be exported: the layer ElmanLayer has no inference module",
    ):
        export_model(suite.TrainedModel(model, suite.vocab(), torch.device("cpu")), tmp_path / "x", "onnx")
    assert not (tmp_path / "x").exists()


def test_register_refuses_a_class_outside_the_family_base() -> None:
    class Plain(nn.Module):
        Config = type("Config", (), {})

    with pytest.raises(TypeError, match="must derive from Encoder"):
        register("encoder", "plain")(Plain)
    assert "plain" not in registry("encoder")


def test_help_and_errors_list_a_newly_registered_kind(toys: None, capsys: pytest.CaptureFixture[str]) -> None:
    """The kinds in ``reglm config`` and in an unknown-kind error come from the registry when
    they are printed: the toys' files add them with no other edit."""
    main(["config"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "toy-elman (a stack of Elman layers)" in lines["model.encoder.kind"]
    assert "toy-softmax (a softmax with a learned temperature)" in lines["model.output.kind"]
    assert "awd-lstm (Merity et al.'s AWD-LSTM)" in lines["model.encoder.kind"]
    with pytest.raises(ReglmError, match=r"unknown encoder 'elman'.*choose one of awd-lstm, .*, toy-elman"):
        build_config("tiny", ["model.encoder=elman"])
