"""Run directories written before the component layout (a flat config, state.pt format 1) keep
working: the fixture was written by that version (a tiny AWD-LSTM on a small corpus, stopped in
its second epoch), and is migrated on read."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reglm.cli import main
from reglm.config import RunConfig, build_config, load_config_file
from reglm.config.aliases import ALIASES, BATCHING_OPTIONS
from reglm.config.schema import has_old_names
from reglm.errors import TrainingInterrupted
from reglm.io import write_json
from reglm.modeldir import load_model_dir
from reglm.train.checkpoint import load_state, save_state
from reglm.train.run import resume, train
from reglm.train.trainer import StopRequest

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
    assert (config.model.encoder.kind, config.model.input.emb_size, config.model.encoder.hidden_size) == (
        "awd-lstm",
        8,
        8,
    )
    assert (config.model.encoder.weight_dropout, config.model.input.dropout) == (
        flat["model"]["weight_dropout"],
        flat["model"]["input_dropout"],
    )
    assert (config.train.optimizer.lr, config.train.averaging.kind, config.train.averaging.nonmono) == (
        flat["train"]["lr"],
        "ntasgd",
        flat["train"]["nonmono"],
    )
    state = load_state(old_run / "state.pt")
    assert state["format"] == 2 and state["schedule"] == {"scale": 1.0} and "lr_scale" not in state


def test_an_old_model_directory_loads_and_evaluates(old_run: Path, capsys: pytest.CaptureFixture) -> None:
    model, config, vocab = load_model_dir(old_run / "best")
    weights = load_file(str(old_run / "best" / "model.safetensors"))
    assert torch.equal(model.embedding.weight.detach(), weights["embedding.weight"])
    assert model.output.weight is model.embedding.weight
    assert main(["eval", str(old_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def _in_todays_layout(run: Path) -> None:
    """Rewrite an old-layout run directory with today's writers: its configuration as
    ``RunConfig.to_dict`` writes it (also inside best/ and last/) and ``state.pt`` in the current format."""
    config = load_config_file(run / "config.json").to_dict()
    write_json(run / "config.json", config)
    for sub in ("best", "last"):
        meta = json.loads((run / sub / "config.json").read_text())
        meta["config"] = config
        write_json(run / sub / "config.json", meta)
    save_state(run / "state.pt", load_state(run / "state.pt"))


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {sub: load_file(str(run / sub / "model.safetensors")) for sub in ("best", "last")}


def test_an_old_run_resumes_bit_for_bit_like_the_same_run_in_todays_layout(old_run: Path, tmp_path: Path) -> None:
    """Both runs are computed here, on this machine and build, so they must agree exactly."""
    current = tmp_path / "current"
    shutil.copytree(old_run, current)
    _in_todays_layout(current)
    assert torch.load(current / "state.pt", weights_only=True)["format"] == 2
    assert torch.load(old_run / "state.pt", weights_only=True)["format"] == 1
    resume(old_run, progress=False)
    resume(current, progress=False)
    old, new = _weights(old_run), _weights(current)
    for sub in ("best", "last"):
        assert old[sub].keys() == new[sub].keys() and all(torch.equal(old[sub][k], new[sub][k]) for k in old[sub]), sub


# The fixture's first half was trained on another machine (an AMD EPYC). float32 matrix kernels of
# other CPU families sum in another order (relative rounding ~1e-7 per product), which the ~80 SGD
# steps at learning rates up to 30 amplify: an Intel Xeon measured 2.3e-6 between the resumed and
# the fresh run (weights up to 1.3). A wrongly migrated schedule (plateau scale 0.5 instead of 1.0)
# moves the final weights by 0.15, so 1e-4 separates rounding from a migration fault.
CROSS_MACHINE_ATOL = 1e-4


def test_an_old_run_resumes_to_the_weights_of_an_uninterrupted_one(old_run: Path, tmp_path: Path) -> None:
    resume(old_run, progress=False)
    fresh = tmp_path / "fresh"
    train(load_config_file(old_run / "config.json"), fresh, progress=False)
    resumed, uninterrupted = _weights(old_run), _weights(fresh)
    for sub in ("best", "last"):
        assert resumed[sub].keys() == uninterrupted[sub].keys(), sub
        for name, tensor in resumed[sub].items():
            torch.testing.assert_close(
                tensor, uninterrupted[sub][name], rtol=0, atol=CROSS_MACHINE_ATOL, msg=f"{sub}/{name}"
            )


def test_a_synthetic_run_of_before_the_rule_option_keeps_its_corpus(old_run: Path) -> None:
    """A config.json without ``data.synthetic_rule`` was written when every synthetic corpus was
    generated by the ``restart`` reading: reading it back names that rule, so the run finds the
    corpus it was trained on; other corpora keep the default, and new files say their rule."""
    raw = json.loads((old_run / "config.json").read_text())
    assert "synthetic_rule" not in raw["data"]
    assert load_config_file(old_run / "config.json").data.synthetic_rule == "stream"  # a directory corpus: unused
    raw["data"]["name"] = "synthetic"
    (old_run / "config.json").write_text(json.dumps(raw))
    config = load_config_file(old_run / "config.json")
    assert config.data.synthetic_rule == "restart"
    del raw["data"]["name"]  # the default corpus is the synthetic one
    (old_run / "config.json").write_text(json.dumps(raw))
    assert load_config_file(old_run / "config.json").data.synthetic_rule == "restart"
    (old_run / "config.json").write_text(build_config(None, []).to_json())
    assert load_config_file(old_run / "config.json").data.synthetic_rule == "stream"


BEFORE_SECTIONS = FIXTURES / "config-before-sections"
"""``config.json`` files as reglm wrote them before ``train`` had its batching, terms and stages
as components and sections (flat ``train.bptt``, ``train.batching=blocks``, ``objective.base_model``)."""


def _at(tree: dict, path: list[str]) -> object:
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            return KeyError
        tree = tree[name]
    return tree


@pytest.mark.parametrize("name", ["bptt", "blocks", "sentences", "discriminator", "reverse-kl"])
def test_a_config_of_before_the_sections_reads_with_the_same_values(name: str) -> None:
    """Every old flat option lands on its new path with its value; an option the chosen kind does
    not have (the old file listed every option for every kind) is the only thing dropped."""
    old = json.loads((BEFORE_SECTIONS / f"{name}.json").read_text())
    config = RunConfig.from_dict(old)
    new = config.to_dict()
    dropped = []
    for section in ("train", "objective"):
        for key, value in old[section].items():
            target = ALIASES.get(f"{section}.{key}", (f"{section}.{key}",))[0].split(".")
            if isinstance(value, str) and isinstance(_at(new, target), dict):
                assert _at(new, [*target, "kind"]) == value, (section, key)
                continue
            got = _at(new, target)
            if got is KeyError:
                owner = _at(new, target[:-1])
                assert isinstance(owner, dict) and "kind" in owner, (section, key)
                dropped.append(f"{section}.{key}")
            else:
                assert got == value, (section, key)
    assert old["model"] == new["model"] and old["data"] == new["data"] and old["seed"] == new["seed"]
    assert RunConfig.from_dict(new) == config
    assert not has_old_names(new)
    assert set(dropped) < {f"train.{option}" for option in BATCHING_OPTIONS} | {
        "objective.discriminator",
        "objective.init_from_base",
        "objective.base_model",
    }


OLD_AND_NEW_OVERRIDES = [
    (
        "tiny",
        ["train.ar_alpha=1.5", "tar_beta=0.5", "train.aug_gamma=0.5", "aug_tau=10", "train.aug_target_grad=true"]
        + ["train.finetune=false", "finetune_epochs=3", "train.finetune_lr=2", "train.advsoft_finetune=false"]
        + ["train.input_noise_std=0.1", "input_noise_anneal=linear", "train.input_noise_epochs=20"]
        + ["train.finetune_input_noise_std=0.05", "log_interval=7", "train.tensorboard=true", "lr=3", "epochs=2"],
        ["train.terms.ar_alpha=1.5", "train.terms.tar_beta=0.5", "train.terms.aug_gamma=0.5"]
        + ["train.terms.aug_tau=10", "train.terms.aug_target_grad=true", "train.finetune.enabled=false"]
        + ["train.finetune.epochs=3", "train.finetune.lr=2", "train.finetune.advsoft=false"]
        + ["train.input_noise.std=0.1", "train.input_noise.anneal=linear", "train.input_noise.epochs=20"]
        + ["train.finetune.input_noise_std=0.05", "train.log.interval=7", "train.log.tensorboard=true"]
        + ["train.optimizer.lr=3", "train.epochs=2"],
    ),
    (
        "tiny",
        ["train.bptt=20", "train.batch_size=4", "train.bptt_max=30", "bptt_min=2", "train.eval_batch_size=2"],
        ["train.batching.bptt=20", "train.batching.batch_size=4", "train.batching.bptt_max=30"]
        + ["train.batching.bptt_min=2", "train.batching.eval_batch_size=2"],
    ),
    (
        "transformer-tiny",
        ["train.block_size=32", "train.eval_context=8", "train.update_freq=2", "train.small_batch_size=none"],
        ["train.batching.block_size=32", "train.batching.eval_context=8", "train.batching.update_freq=2"]
        + ["train.batching.small_batch_size=none"],
    ),
    (
        "transformer-tiny",
        ["train.max_tokens=64", "train.batching=sentences", "train.bptt=50", "train.small_batch_size=none"],
        ["train.batching=sentences", "train.batching.max_tokens=64"],
    ),
]


@pytest.mark.parametrize("preset, old, new", OLD_AND_NEW_OVERRIDES)
def test_old_flat_overrides_build_the_config_of_the_new_names(preset: str, old: list[str], new: list[str]) -> None:
    """An old flat name sets its new path; one the chosen kind does not read is ignored, as it was."""
    assert build_config(preset, old) == build_config(preset, new) != build_config(preset)


def _before_sections(raw: dict) -> dict:
    """``raw`` (today's ``config.json``) as it was written before the sections: every option that
    has an old flat name back under it (``train.finetune``, a section's name, last), the batching
    a kind name, every objective option listed."""
    raw = json.loads(json.dumps(raw))
    for alias, targets in sorted(ALIASES.items(), key=lambda item: item[0] == "train.finetune"):
        section, name = alias.split(".")
        path = targets[0].split(".")
        if section != "train" or path[1] not in ("batching", "terms", "input_noise", "finetune", "log"):
            continue
        owner = _at(raw, path[:-1])
        if isinstance(owner, dict) and path[-1] in owner:
            raw[section][name] = owner.pop(path[-1])
    for section in ("terms", "input_noise", "log"):
        assert raw["train"].pop(section) == {}, section
    raw["train"]["batching"] = raw["train"]["batching"].pop("kind")
    raw["objective"] = {"discriminator": None, "init_from_base": False, **raw["objective"]}
    return raw


def test_a_run_of_before_the_sections_resumes_bit_for_bit_like_an_uninterrupted_one(tmp_path: Path) -> None:
    """A run stopped mid-epoch whose ``config.json`` is of the layout before the sections resumes
    to the weights of the same run never stopped (both computed here: exact)."""
    config = build_config(
        "tiny",
        ["data.synthetic_sentences=80", "train.epochs=2", "train.finetune_epochs=1", "train.input_noise_std=0.05"]
        + ["train.checkpoint_interval=3", "train.aug_gamma=0.2"],
    )
    train(config, tmp_path / "straight", progress=False)
    stop = StopRequest()

    def stop_at_step_5(trainer: object) -> None:
        if trainer.step == 5:
            stop.request(signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        train(config, tmp_path / "old", progress=False, stop=stop, step_hooks=[stop_at_step_5])
    old = _before_sections(json.loads((tmp_path / "old" / "config.json").read_text()))
    assert has_old_names(old) and "bptt" in old["train"] and isinstance(old["train"]["batching"], str)
    write_json(tmp_path / "old" / "config.json", old)
    resume(tmp_path / "old", progress=False)
    assert json.loads((tmp_path / "old" / "config.json").read_text()) == old, "the run's own file is kept"
    want, got = _weights(tmp_path / "straight"), _weights(tmp_path / "old")
    for sub in ("best", "last"):
        assert want[sub].keys() == got[sub].keys() and all(torch.equal(want[sub][k], got[sub][k]) for k in want[sub])
