"""Config: presets, overrides, validation, JSON round trip."""

from __future__ import annotations

import dataclasses

import pytest

from reglm.config import (
    ModelConfig,
    RunConfig,
    build_config,
    describe_options,
    list_presets,
    load_preset,
    parse_assignments,
)
from reglm.errors import ReglmError


def test_overrides_are_typed_and_nested() -> None:
    cfg = build_config(
        None,
        ["train.lr=12", "emb_size=64", "bptt_max=none", "tie_weights=false", "seed=7", "model.encoder.hidden_size=30"],
    )
    assert cfg.train.optimizer.lr == 12.0 and isinstance(cfg.train.optimizer.lr, float)
    assert cfg.model.input.emb_size == 64
    assert cfg.train.batching.bptt_max is None
    assert cfg.model.output.tie_weights is False and cfg.model.encoder.hidden_size == 30
    assert cfg.seed == 7


def test_preset_then_overrides() -> None:
    cfg = build_config("awd-lstm-ptb", ["train.epochs=3"])
    assert cfg.train.epochs == 3
    assert (cfg.model.input.emb_size, cfg.model.encoder.hidden_size, cfg.model.encoder.num_layers) == (400, 1150, 3)
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
    m, e, t = cfg.model, cfg.model.encoder, cfg.train
    assert cfg.data.name == expected["data"]
    assert t.batching.batch_size == expected["batch"] and m.input.dropout == expected["dropouti"]
    assert (e.hidden_dropout, e.output_dropout, m.input.embed_dropout, e.weight_dropout) == (0.3, 0.4, 0.1, 0.5)
    assert (
        t.optimizer.lr,
        t.clip,
        t.epochs,
        t.batching.eval_batch_size,
        t.batching.test_batch_size,
        t.batching.bptt,
    ) == (
        30.0,
        0.25,
        750,
        10,
        1,
        70,
    )
    assert (t.terms.ar_alpha, t.terms.tar_beta, t.averaging.nonmono, t.averaging.kind, t.finetune.enabled) == (
        2.0,
        1.0,
        5,
        "ntasgd",
        True,
    )
    assert m.output.tie_weights


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
        (["model.input_dropout=1.5"], "model.input.dropout"),
        (["train.optimizer=adagrad"], "optimizer"),
        (["train.optimizer=ntasgd"], "train.averaging=ntasgd"),
        (["init_range=0.5"], "ambiguous"),
        (["model.encoder=vd-lstm", "model.encoder.weight_dropout=0.1"], "weight_dropout"),
        (["model.*nothing=1"], "matches no option"),
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
    assert parse_assignments(["train.lr=1", "seed=2", "x=1e-9", "y=none"]) == [
        ("train.lr", 1),
        ("seed", 2),
        ("x", 1e-9),
        ("y", None),
    ]


def test_old_flat_names_are_aliases_of_their_component_paths() -> None:
    old = build_config(
        None,
        [
            "model.emb_size=40",
            "model.hidden_size=50",
            "model.input_dropout=0.3",
            "model.advsoft=relative",
            "model.advsoft_alpha=0.2",
            "train.lr=5",
            "train.trigger=paper",
            "train.lr_decay=0.5",
        ],
    )
    new = build_config(
        None,
        [
            "model.input.emb_size=40",
            "model.encoder.hidden_size=50",
            "model.input.dropout=0.3",
            "model.output.advsoft=relative",
            "model.output.advsoft.alpha=0.2",
            "train.optimizer.lr=5",
            "train.averaging.trigger=paper",
            "train.schedule.decay=0.5",
        ],
    )
    assert old == new


def test_changing_a_kind_keeps_the_settings_the_new_kind_has() -> None:
    cfg = build_config("tiny", ["model.encoder=vd-lstm", "model.encoder.hidden_size=16"])
    assert (
        cfg.model.encoder.kind == "vd-lstm"
        and cfg.model.encoder.num_layers == 2
        and cfg.model.encoder.hidden_dropout == 0.1
    )
    assert not hasattr(cfg.model.encoder, "weight_dropout")
    assert build_config("mos-tiny", ["model.output=doc", "model.output.doc_experts=2"]).model.output.n_experts == 3


def test_a_pattern_sets_every_matching_option_that_exists() -> None:
    awd = build_config("mos-tiny", ["model.*dropout=0"])
    dropouts = (
        awd.model.input.dropout,
        awd.model.input.embed_dropout,
        awd.model.encoder.hidden_dropout,
        awd.model.encoder.output_dropout,
        awd.model.encoder.weight_dropout,
        awd.model.output.latent_dropout,
    )
    assert dropouts == (0.0,) * 6
    vd = build_config("vd-lstm-ptb-small", ["model.*dropout=0"])
    assert (vd.model.input.dropout, vd.model.encoder.hidden_dropout) == (0.0, 0.0)


def test_model_config_build_takes_any_key_form() -> None:
    assert ModelConfig.build(emb_size=12, encoder__hidden_size=20, input_dropout=0.5).input.dropout == 0.5
    assert ModelConfig.build(encoder="vd-lstm", hidden_size=12, emb_size=12).encoder.kind == "vd-lstm"


def test_a_config_of_the_flat_layout_migrates_on_read() -> None:
    flat = {
        "data": {"name": "synthetic"},
        "seed": 3,
        "model": {
            "encoder": "vd-lstm",
            "emb_size": 12,
            "hidden_size": 12,
            "last_hidden_size": None,
            "num_layers": 2,
            "tie_weights": True,
            "embed_dropout": 0.0,
            "input_dropout": 0.5,
            "hidden_dropout": 0.4,
            "output_dropout": 0.0,
            "weight_dropout": 0.0,
            "init_range": 0.05,
            "output_bias": False,
            "advsoft": None,
            "advsoft_alpha": 0.005,
            "output": "softmax",
            "n_experts": 15,
            "latent_dropout": 0.1,
            "doc_experts": None,
            "mixture_penalty": 0.0,
        },
        "train": {
            "lr": 1.0,
            "weight_decay": 0.0,
            "optimizer": "sgd",
            "trigger": "reference",
            "nonmono": 5,
            "lr_decay": 0.9,
            "lr_decay_start": 5,
            "plateau_factor": None,
            "epochs": 4,
        },
    }
    cfg = RunConfig.from_dict(flat)
    m, t = cfg.model, cfg.train
    assert (m.encoder.kind, m.encoder.hidden_size, m.encoder.hidden_dropout, m.encoder.init_range) == (
        "vd-lstm",
        12,
        0.4,
        0.05,
    )
    assert (m.input.dropout, m.input.init_range, m.output.bias, m.output.tie_weights, m.output.init_range) == (
        0.5,
        0.05,
        False,
        True,
        0.05,
    )
    assert (t.optimizer.lr, t.averaging.kind, t.schedule.decay, t.schedule.decay_start, t.epochs) == (
        1.0,
        "none",
        0.9,
        5,
        4,
    )


@pytest.mark.parametrize(
    ("name", "base", "noise"),
    [("awd-lstm-advsoft-ptb", "awd-lstm-ptb", 0.15), ("awd-lstm-advsoft-wt2", "awd-lstm-wt2", 0.175)],
)
def test_advsoft_presets_keep_the_awd_lstm_hyperparameters(name: str, base: str, noise: float) -> None:
    """Wang et al. 2019, section 5: "all other the parameters and architectures untouched"."""
    cfg, ref = build_config(name), build_config(base)
    assert cfg.data == ref.data
    advsoft = cfg.model.output.advsoft
    assert (advsoft.kind, advsoft.alpha, advsoft.grad) == ("relative", 0.005, "stop")
    assert (cfg.model.input, cfg.model.encoder) == (ref.model.input, ref.model.encoder)
    assert {k: v for k, v in cfg.model.output.__dict__.items() if k != "advsoft"} == {
        k: v for k, v in ref.model.output.__dict__.items() if k != "advsoft"
    }
    noise_fields = {"input_noise", "finetune", "advsoft_stop_epoch"}
    assert {k: v for k, v in cfg.train.__dict__.items() if k not in noise_fields} == {
        k: v for k, v in ref.train.__dict__.items() if k not in noise_fields
    }
    stage = {"input_noise_std": 0.0, "advsoft": True}
    assert dataclasses.replace(cfg.train.finetune, **stage) == dataclasses.replace(ref.train.finetune, **stage)
    assert (cfg.train.input_noise.std, cfg.train.input_noise.anneal, cfg.train.finetune.input_noise_std) == (
        noise,
        "constant",
        0.0,
    )


def test_presets_extend_other_presets(tmp_path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("extends: tiny\nmodel:\n  emb_size: 20\n")
    cfg, tiny = build_config(str(child)), build_config("tiny")
    assert cfg.model.input.emb_size == 20 and cfg.model.encoder == tiny.model.encoder and cfg.train == tiny.train
    grandchild = tmp_path / "grandchild.yaml"
    grandchild.write_text(f"extends: {child}\ntrain:\n  lr: 3\n")
    cfg = build_config(str(grandchild))
    assert (cfg.model.input.emb_size, cfg.train.optimizer.lr, cfg.train.epochs) == (20, 3.0, tiny.train.epochs)


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


def test_reglm_config_lists_every_option_with_the_default_kinds_values() -> None:
    lines = {line.split()[0]: line for line in describe_options().splitlines()}
    assert "'ntasgd'" in lines["train.averaging.kind"] and "[none, ntasgd]" in lines["train.averaging.kind"]
    assert "'awd-lstm'" in lines["model.encoder.kind"] and "transformer" in lines["model.encoder.kind"]
    for family, kinds in (
        ("model.input.kind", ("embedding", "adaptive", "char-cnn")),
        ("model.output.kind", ("softmax", "mos", "doc", "adaptive")),
    ):
        assert all(kind in lines[family] for kind in kinds)
    assert "'reference'" in lines["train.averaging.trigger"]
    assert "[nesterov]" in lines["train.optimizer.momentum"] and "[cosine]" in lines["train.schedule.warmup_steps"]


@pytest.mark.parametrize(
    "items, suggestion",
    [
        (["train.lrr=1"], "did you mean train.lr?"),
        (["lrr=1"], "did you mean lr, i.e. train.optimizer.lr?"),
        (["model.encoder.hiden_size=3"], "did you mean model.encoder.hidden_size?"),
        (["modle.encoder.hidden_size=3"], "did you mean model.encoder.hidden_size?"),
        (["dropot=0.1"], "did you mean model.encoder.dropout or model.input.dropout?"),
        (["train.optimizer=adamm"], "did you mean adam?"),
    ],
)
def test_unknown_names_get_a_suggestion(items: list[str], suggestion: str) -> None:
    with pytest.raises(ReglmError) as info:
        build_config(None, items)
    assert suggestion in str(info.value)


def test_unknown_preset_gets_a_suggestion_and_far_names_none() -> None:
    with pytest.raises(ReglmError, match=r"unknown preset 'tinyy' \(did you mean tiny\?\)"):
        load_preset("tinyy")
    with pytest.raises(ReglmError) as info:
        build_config(None, ["train.nope=1"])
    assert "did you mean" not in str(info.value)


def test_a_bad_value_blames_the_override_not_the_preset(tmp_path) -> None:
    with pytest.raises(ReglmError, match=r"^override train\.optimizer\.lr=abc: 'abc' is not a number"):
        build_config("tiny", ["train.optimizer.lr=abc"])
    with pytest.raises(ReglmError, match=r"^override lr=abc \(option train\.optimizer\.lr\): 'abc'"):
        build_config("tiny", ["lr=abc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: tiny\ntrain:\n  lr: abc\n")
    with pytest.raises(ReglmError, match=rf"^preset {bad}: train\.optimizer\.lr: 'abc'"):
        build_config(str(bad), ["epochs=2"])
    assert build_config(str(bad), ["lr=3"]).train.optimizer.lr == 3.0, "the override replaces the preset's value"
    bad.write_text("train:\n  nope: 1\n")
    with pytest.raises(ReglmError, match=rf"^preset {bad}: unknown override key 'train.nope'"):
        build_config(str(bad))


@pytest.mark.parametrize("preset", ["tiny", "advsoft-tiny", "transformer-tiny", "vd-lstm-ptb-small-real"])
def test_the_resolved_lines_set_the_same_config_again(preset: str) -> None:
    from reglm.config import describe_values

    cfg = build_config(preset, ["lr=5"])
    lines = describe_values(cfg).splitlines()
    assert "train.optimizer.lr=5.0" in lines and "data.data_dir=none" in lines
    assert build_config(None, lines) == cfg


def test_a_kind_written_none_is_the_kind_none() -> None:
    cfg = build_config(
        "advsoft-tiny", ["model.output.advsoft.kind=none", "train.averaging.kind=none", "train.finetune=false"]
    )
    assert (cfg.model.output.advsoft.kind, cfg.train.averaging.kind) == ("none", "none")
