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
