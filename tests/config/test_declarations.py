"""What a family's component declares, and the code outside the family that asks it instead of
branching on kinds: the fine-tuning check asks the averaging policy (``finetunes``), the commands
that read a model directory ask its objective (``produces``), and ``reglm reproduce --scale
reduced`` asks the schedule and averaging configs for their options counting epochs
(``fewer_epochs``) and the input and encoder configs for their widths (``widths``); a preset's
``starts_from`` asks the objective registry. A kind registered with a declaration is treated by it
with no other edit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest

from reglm.config import build_config
from reglm.config.fields import kind_field, option
from reglm.config.kinds import registry
from reglm.config.presets import StartsFrom, metadata_of
from reglm.errors import ReglmError
from reglm.optim.optimizers import NTASGD
from reglm.optim.schedules import DecayScheduleConfig
from reglm.reproduce.plan import Budget, epoch_overrides, reduced_widths, width_options
from reglm.rundir import require_kind

FINETUNE_OFF = "or train.finetune.enabled=false"


def test_fine_tuning_needs_an_averaging_policy_that_declares_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for kind, policy in registry("averaging").items():
        assert isinstance(policy.finetunes, bool), kind
        overrides = [f"train.averaging={kind}", "train.finetune.enabled=true"]
        if policy.finetunes:
            assert build_config("tiny", overrides).train.averaging.kind == kind
        else:
            with pytest.raises(ReglmError, match=f"set train.averaging=ntasgd {FINETUNE_OFF}"):
                build_config("tiny", overrides)
    assert not build_config("tiny", ["train.averaging=none", "train.finetune.enabled=false"]).train.finetune.enabled

    @dataclasses.dataclass(frozen=True)
    class RestartingConfig:
        kind: str = kind_field("restarting", "a policy that restarts for fine-tuning")
        nonmono: int = option(5, "interval")

    class Restarting(NTASGD):
        Config = RestartingConfig

    monkeypatch.setitem(registry("averaging"), "restarting", Restarting)
    assert build_config("tiny", ["train.averaging=restarting"]).train.averaging.kind == "restarting"
    with pytest.raises(ReglmError, match=f"set train.averaging=ntasgd or restarting {FINETUNE_OFF}"):
        build_config("tiny", ["train.averaging=none"])
    monkeypatch.setattr(Restarting, "finetunes", False)
    with pytest.raises(ReglmError, match="invalid option train.finetune.enabled"):
        build_config("tiny", ["train.averaging=restarting"])


def test_a_model_directory_is_what_its_objective_declares_it_produces(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert all(objective.produces in ("lm", "discriminator") for objective in registry("objective").values())
    builtin = {kind: registry("objective")[kind].produces for kind in ("lm", "discriminator", "reverse-kl")}
    assert builtin == {"lm": "lm", "discriminator": "discriminator", "reverse-kl": "lm"}
    for kind in ("lm", "reverse-kl"):
        require_kind(kind, tmp_path, "lm")
        with pytest.raises(ReglmError, match=rf"is not a discriminator \(its run minimized objective '{kind}'\)"):
            require_kind(kind, tmp_path, "discriminator")
    require_kind("discriminator", tmp_path, "discriminator")
    with pytest.raises(ReglmError, match=r"is a discriminator \(Popov & Kudinov\), not a language model"):
        require_kind("discriminator", tmp_path, "lm")
    monkeypatch.setitem(registry("objective"), "critic", type("Critic", (), {"produces": "discriminator"}))
    require_kind("critic", tmp_path, "discriminator")
    with pytest.raises(ReglmError, match="not a language model"):
        require_kind("critic", tmp_path, "lm")


@pytest.mark.parametrize("family", ["schedule", "averaging"])
def test_every_schedule_and_averaging_names_its_own_options_counting_epochs(family: str) -> None:
    for kind, component in registry(family).items():
        overrides = [f"train.{family}={kind}", "train.finetune.enabled=false"]
        fewer = getattr(build_config("tiny", overrides).train, family).fewer_epochs(10)
        assert set(fewer) <= {f.name for f in dataclasses.fields(component.Config)} - {"kind"}, kind
        options = [(f"train.{family}.{name}", value) for name, value in fewer.items()]
        reduced = getattr(build_config("tiny", overrides, options).train, family)
        assert all(getattr(reduced, name) == value for name, value in fewer.items()), kind


@pytest.mark.parametrize("family", ["input", "encoder", "output"])
def test_every_model_component_declares_widths_of_its_own_options_or_none(family: str) -> None:
    for kind, component in registry(family).items():
        widths = component.Config().widths()
        assert widths is None or (
            set(widths) <= {f.name for f in dataclasses.fields(component.Config)}
            and all(isinstance(value, int) for value in widths.values())
        ), kind


def test_a_preset_starts_from_any_registered_objective_and_names_what_reads_a_discriminator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``starts_from``'s objective is a registered kind, and its ``discriminator`` is accepted by
    the objectives whose config has that option."""
    with pytest.raises(ReglmError, match="choose one of lm, discriminator, reverse-kl"):
        metadata_of("mine", {"starts_from": {"run": "tiny", "objective": "critic"}})

    @dataclasses.dataclass(frozen=True)
    class CriticConfig:
        kind: str = kind_field("critic", "a critic")
        base_model: str | None = option(None, "q0")
        discriminator: str | None = option(None, "the critic's discriminator")

    monkeypatch.setitem(registry("objective"), "critic", type("Critic", (), {"Config": CriticConfig}))
    starts = metadata_of("mine", {"starts_from": {"run": "tiny", "objective": "critic", "discriminator": "tiny"}})
    assert starts.starts_from == StartsFrom("tiny", "critic", "tiny")
    with pytest.raises(ReglmError, match="discriminator is read by objective reverse-kl or critic only"):
        metadata_of("mine", {"starts_from": {"run": "tiny", "objective": "lm", "discriminator": "tiny"}})


def _fewer(value: int) -> int:
    """An epoch count at the reduced scale, written out: a tenth, rounded half up, at least 1."""
    return max(1, math.floor(value / 10 + 0.5))


def test_the_reduced_scale_shrinks_the_epoch_options_each_component_declares() -> None:
    config = build_config("vd-lstm-ptb-medium")
    s, a, t = config.train.schedule, config.train.averaging, config.train
    assert (s.kind, a.kind, s.decay, s.decay_start) == ("decay", "none", 0.9, 10)
    assert epoch_overrides(config, "reduced", Budget()) == [
        ("train.schedule.decay_start", 1),
        ("train.schedule.decay", 0.9**10),
        ("train.schedule.nonmono_interval", _fewer(s.nonmono_interval)),
        ("train.epochs", _fewer(t.epochs)),
        ("train.finetune.epochs", _fewer(t.finetune.epochs)),
    ]
    awd = build_config("awd-lstm-ptb")
    reduced = dict(epoch_overrides(awd, "reduced", Budget(epochs=2)))
    assert reduced["train.averaging.nonmono"] == _fewer(awd.train.averaging.nonmono) == 1
    assert (reduced["train.epochs"], reduced["train.finetune.epochs"]) == (2, 2)
    assert epoch_overrides(awd, "full", Budget()) == [
        ("train.epochs", awd.train.epochs),
        ("train.finetune.epochs", awd.train.finetune.epochs),
    ]
    cosine = build_config("transformer-tiny")
    assert cosine.train.schedule.kind == "cosine" and not any(
        key.startswith("train.schedule.") for key, _ in epoch_overrides(cosine, "reduced", Budget())
    ), "the cosine schedule counts steps"


def test_a_registered_schedule_is_shrunk_by_its_own_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclasses.dataclass(frozen=True)
    class WarmConfig:
        kind: str = kind_field("warm", "warm-up over epochs")
        warm_epochs: int = option(25, "epochs of warm-up")

        def fewer_epochs(self, factor: int) -> dict[str, Any]:
            return {"warm_epochs": self.warm_epochs // factor}

    monkeypatch.setitem(registry("schedule"), "warm", type("Warm", (), {"Config": WarmConfig}))
    config = build_config("tiny", ["train.schedule=warm"])
    assert epoch_overrides(config, "reduced", Budget())[:2] == [
        ("train.schedule.warm_epochs", 2),
        ("train.averaging.nonmono", 1),
    ]


@pytest.mark.parametrize(
    "preset, widths",
    [
        ("awd-lstm-ptb", {"model.input.emb_size": 100, "model.encoder.hidden_size": 288}),
        (
            "mos-awd-lstm-ptb",
            {"model.input.emb_size": 70, "model.encoder.hidden_size": 240, "model.encoder.last_hidden_size": 155},
        ),
        ("vd-lstm-ptb-medium", {"model.input.emb_size": 163, "model.encoder.hidden_size": 163}),
        ("tiny", {"model.input.emb_size": 8, "model.encoder.hidden_size": 8}),
    ],
)
def test_the_reduced_scale_divides_the_widths_the_input_and_encoder_declare(preset: str, widths: dict) -> None:
    """A quarter, rounded half up (1150 / 4 = 287.5 -> 288, 650 / 4 = 162.5 -> 163), at least 8;
    the reduced config has exactly those widths."""
    config = build_config(preset)
    assert dict(reduced_widths(config, preset)) == widths
    reduced = build_config(preset, [], reduced_widths(config, preset))
    assert dict(width_options(reduced, preset)) == widths


@pytest.mark.parametrize(
    "preset, kinds",
    [("transformer-tiny", "transformer encoder and a adaptive"), ("qrnn-ptb", "qrnn encoder and a embedding")],
)
def test_a_component_without_widths_refuses_the_reduced_scale(preset: str, kinds: str) -> None:
    with pytest.raises(
        ReglmError, match=rf"shrinks LSTM models with a word embedding; {preset} has a {kinds} input: use --scale full"
    ):
        reduced_widths(build_config(preset), preset)


@pytest.mark.parametrize("decay_epochs, reduced_epochs", [(None, None), (1, 1), (20, 2), (25, 3)])
def test_a_reduced_decay_divides_the_rate_as_much_as_the_full_one(decay_epochs: int | None, reduced_epochs) -> None:
    """At a 10 times shorter scale the decay schedule ends where the full one does: every epoch
    decays as 10 did, or, when the decay spans ``decay_epochs`` epochs, the same total decay over
    a tenth of them (``decay=0.1 decay_epochs=1``, the AWD-LSTM code's ``--when``: still /10 once)."""
    full = DecayScheduleConfig(decay=0.1, decay_start=12, decay_epochs=decay_epochs)
    fewer = full.fewer_epochs(10)
    assert fewer["decay_start"] == 1 and fewer.get("decay_epochs") == reduced_epochs
    reduced = dataclasses.replace(full, **fewer)
    if decay_epochs is None:
        assert reduced.decay == pytest.approx(0.1**10, rel=1e-12)
    else:
        assert reduced.decay**reduced.decay_epochs == pytest.approx(0.1**decay_epochs, rel=1e-9)
