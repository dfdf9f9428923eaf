"""Run directories written before the component layout (a flat config, state.pt format 1) keep
working: the fixture was written by that version (a tiny AWD-LSTM on a small corpus, stopped in
its second epoch), and is migrated on read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reglm.cli import main
from reglm.config import load_config_file
from reglm.train.checkpoint import load_model_dir, load_state
from reglm.train.run import resume, train

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "run-flat-layout", run)
    corpus = str(FIXTURES / "run-flat-layout-corpus")
    for path in (run / "config.json", run / "best" / "config.json", run / "last" / "config.json"):
        raw = json.loads(path.read_text())
        (raw["config"] if "config" in raw else raw)["data"]["name"] = corpus
        path.write_text(json.dumps(raw))
    return run


def test_the_flat_config_reads_as_the_component_layout(old_run: Path) -> None:
    flat = json.loads((old_run / "config.json").read_text())
    assert isinstance(flat["model"]["encoder"], str) and "lr" in flat["train"], "the fixture is of the old layout"
    config = load_config_file(old_run / "config.json")
    assert (config.model.encoder.kind, config.model.input.emb_size, config.model.encoder.hidden_size) == ("awd-lstm", 8, 8)
    assert (config.model.encoder.weight_dropout, config.model.input.dropout) == (flat["model"]["weight_dropout"], flat["model"]["input_dropout"])
    assert (config.train.optimizer.lr, config.train.averaging.kind, config.train.averaging.nonmono) == (flat["train"]["lr"], "ntasgd", flat["train"]["nonmono"])
    state = load_state(old_run / "state.pt")
    assert state["format"] == 2 and state["schedule"] == {"scale": 1.0} and "lr_scale" not in state


def test_an_old_model_directory_loads_and_evaluates(old_run: Path, capsys: pytest.CaptureFixture) -> None:
    model, config, vocab = load_model_dir(old_run / "best")
    weights = load_file(str(old_run / "best" / "model.safetensors"))
    assert torch.equal(model.embedding.weight.detach(), weights["embedding.weight"])
    assert model.output.weight is model.embedding.weight
    assert main(["eval", str(old_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_an_old_run_resumes_to_the_weights_of_an_uninterrupted_one(old_run: Path, tmp_path: Path) -> None:
    resume(old_run, progress=False)
    fresh = tmp_path / "fresh"
    train(load_config_file(old_run / "config.json"), fresh, progress=False)
    for sub in ("best", "last"):
        a, b = load_file(str(old_run / sub / "model.safetensors")), load_file(str(fresh / sub / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
