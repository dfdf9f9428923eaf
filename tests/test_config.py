"""Config: presets, overrides, validation, JSON round trip."""

from __future__ import annotations

import pytest

from reglm.config import RunConfig, build_config, list_presets, load_preset, parse_overrides
from reglm.errors import ReglmError


def test_overrides_are_typed_and_nested() -> None:
    cfg = build_config(None, ["train.lr=12", "emb_size=64", "bptt_max=none", "tie_weights=false", "seed=7"])
    assert cfg.train.lr == 12.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.emb_size == 64
    assert cfg.train.bptt_max is None
    assert cfg.model.tie_weights is False
    assert cfg.seed == 7


def test_preset_then_overrides() -> None:
    cfg = build_config("awd-lstm-ptb", ["train.epochs=3"])
    assert cfg.train.epochs == 3
    assert (cfg.model.emb_size, cfg.model.hidden_size, cfg.model.num_layers) == (400, 1150, 3)
    assert cfg.preset == "awd-lstm-ptb"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("awd-lstm-ptb", dict(batch=40, dropouti=0.4, data="ptb")),
        ("awd-lstm-wt2", dict(batch=80, dropouti=0.65, data="wikitext-2")),
    ],
)
def test_awd_presets_match_the_paper(name: str, expected: dict) -> None:
    cfg = build_config(name)
    m, t = cfg.model, cfg.train
    assert cfg.data.name == expected["data"]
    assert t.batch_size == expected["batch"] and m.input_dropout == expected["dropouti"]
    assert (m.hidden_dropout, m.output_dropout, m.embed_dropout, m.weight_dropout) == (0.3, 0.4, 0.1, 0.5)
    assert (t.lr, t.clip, t.epochs, t.eval_batch_size, t.test_batch_size, t.bptt) == (30.0, 0.25, 750, 10, 1, 70)
    assert (t.ar_alpha, t.tar_beta, t.nonmono, t.optimizer, t.finetune) == (2.0, 1.0, 5, "ntasgd", True)
    assert m.tie_weights


def test_every_preset_loads_and_names_its_source() -> None:
    names = [n for n, _ in list_presets()]
    assert {"awd-lstm-ptb", "awd-lstm-wt2", "tiny"} <= set(names)
    for name, description in list_presets():
        assert description
        build_config(name)


def test_json_round_trip() -> None:
    cfg = build_config("tiny", ["lr=3"])
    import json

    assert RunConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.mark.parametrize(
    "items, fragment",
    [
        (["train.nope=1"], "unknown override key"),
        (["nope=1"], "unknown override key"),
        (["lr"], "not key=value"),
        (["lr=abc"], "not a number"),
        (["model.input_dropout=1.5"], "input_dropout"),
        (["train.optimizer=adam"], "optimizer"),
        (["epochs=0"], "epochs"),
        (["tie_weights=maybe"], "true or false"),
    ],
)
def test_bad_overrides_name_the_option(items: list[str], fragment: str) -> None:
    with pytest.raises(ReglmError, match=fragment):
        build_config(None, items)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ReglmError, match="awd-lstm-ptb"):
        load_preset("no-such-preset")


def test_override_parse_shape() -> None:
    assert parse_overrides(["train.lr=1", "seed=2"]) == {"train": {"lr": 1}, "seed": 2}


@pytest.mark.parametrize(("name", "base", "noise"), [("awd-lstm-advsoft-ptb", "awd-lstm-ptb", 0.15), ("awd-lstm-advsoft-wt2", "awd-lstm-wt2", 0.175)])
def test_advsoft_presets_keep_the_awd_lstm_hyperparameters(name: str, base: str, noise: float) -> None:
    """Wang et al. 2019, section 5: "all other the parameters and architectures untouched"."""
    cfg, ref = build_config(name), build_config(base)
    assert cfg.data == ref.data
    assert cfg.model.advsoft == "relative" and cfg.model.advsoft_alpha == 0.005 and cfg.model.advsoft_grad == "stop"
    advsoft_fields = {"advsoft", "advsoft_alpha", "advsoft_epsilon", "advsoft_grad", "advsoft_positive_only"}
    assert {k: v for k, v in cfg.model.__dict__.items() if k not in advsoft_fields} == {k: v for k, v in ref.model.__dict__.items() if k not in advsoft_fields}
    noise_fields = {"input_noise_std", "input_noise_anneal", "input_noise_epochs", "finetune_input_noise_std", "advsoft_finetune", "advsoft_stop_epoch"}
    assert {k: v for k, v in cfg.train.__dict__.items() if k not in noise_fields} == {k: v for k, v in ref.train.__dict__.items() if k not in noise_fields}
    assert (cfg.train.input_noise_std, cfg.train.input_noise_anneal, cfg.train.finetune_input_noise_std) == (noise, "constant", 0.0)


def test_presets_extend_other_presets(tmp_path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("extends: tiny\nmodel:\n  emb_size: 20\n")
    cfg, tiny = build_config(str(child)), build_config("tiny")
    assert cfg.model.emb_size == 20 and cfg.model.hidden_size == tiny.model.hidden_size and cfg.train == tiny.train
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text(f"extends: {child}\ntrain:\n  lr: 3\n")
    cfg = build_config(str(grandchild))
    assert (cfg.model.emb_size, cfg.train.lr, cfg.train.epochs) == (20, 3.0, tiny.train.epochs)


def test_preset_cycles_and_bad_parents_are_errors(tmp_path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"extends: {b}\n")
    b.write_text(f"extends: {a}\n")
    with pytest.raises(ReglmError, match="cycle"):
        build_config(str(a))
    a.write_text("extends: [tiny, tiny]\n")
    with pytest.raises(ReglmError, match="extends must name one preset"):
        build_config(str(a))
    a.write_text("extends: no-such-preset\n")
    with pytest.raises(ReglmError, match="unknown preset 'no-such-preset'"):
        build_config(str(a))
