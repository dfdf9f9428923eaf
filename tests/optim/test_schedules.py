"""Variable BPTT lengths (AWD-LSTM 4.1) and the per-batch learning-rate rescaling."""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from reglm.config import RunConfig, build_config
from reglm.data import load_corpus
from reglm.data.batchings import sample_bptt, scaled_lr
from reglm.errors import ReglmError, TrainingInterrupted
from reglm.optim.schedules import DecaySchedule, DecayScheduleConfig
from reglm.train.checkpoint import load_state
from reglm.train.run import resume, train
from reglm.train.trainer import StopRequest, Trainer


def _draw(seed: int, count: int, **kw) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [sample_bptt(g, **kw) for _ in range(count)]


def test_distribution_matches_the_two_component_mixture() -> None:
    bptt, p, std = 70, 0.95, 5.0
    lengths = torch.tensor(_draw(1, 20_000, bptt=bptt, p=p, std=std), dtype=torch.float64)
    # The components N(70, 5) and N(35, 5) are 7 std apart: split at the midpoint.
    half = lengths < 0.75 * bptt
    assert abs(half.double().mean().item() - (1 - p)) < 0.006  # ~4 binomial standard errors
    full = lengths[~half]
    assert abs(full.mean().item() - bptt) < 0.15  # rounding to nearest: no -0.5 shift
    assert abs(full.std().item() - std) < 0.12
    short = lengths[half]
    assert abs(short.mean().item() - bptt / 2) < 1.0
    assert bool((lengths >= 5).all())


def test_min_and_max_are_respected_and_reached() -> None:
    lengths = _draw(2, 5_000, bptt=10, std=5.0, min_len=5, max_len=12)
    assert min(lengths) == 5 and max(lengths) == 12
    assert all(isinstance(x, int) for x in lengths)
    assert min(_draw(2, 2_000, bptt=10, std=5.0, min_len=7)) == 7


def test_zero_std_gives_the_bases_rounded_half_up() -> None:
    assert set(_draw(3, 50, bptt=35, p=1.0, std=0.0)) == {35}
    assert set(_draw(3, 50, bptt=35, p=0.0, std=0.0)) == {18}  # 17.5 rounds up
    assert set(_draw(3, 500, bptt=35, p=0.5, std=0.0)) == {18, 35}


def test_same_seed_same_sequence_and_other_seed_differs() -> None:
    assert _draw(7, 200, bptt=70) == _draw(7, 200, bptt=70)
    assert _draw(7, 200, bptt=70) != _draw(8, 200, bptt=70)


def test_generator_state_restore_reproduces_the_continuation() -> None:
    g = torch.Generator().manual_seed(11)
    head = [sample_bptt(g, 70) for _ in range(37)]
    saved = g.get_state()
    tail = [sample_bptt(g, 70) for _ in range(100)]

    resumed = torch.Generator()
    resumed.set_state(saved)
    assert [sample_bptt(resumed, 70) for _ in range(100)] == tail
    assert head + tail == _draw(11, 137, bptt=70)


def test_draws_exactly_two_numbers_per_call_whatever_the_options() -> None:
    a = torch.Generator().manual_seed(5)
    b = torch.Generator().manual_seed(5)
    sample_bptt(a, 70, p=1.0, std=0.0)
    sample_bptt(b, 20, p=0.0, std=3.0, min_len=1, max_len=2)
    torch.testing.assert_close(a.get_state(), b.get_state(), rtol=0, atol=0)


def test_scaled_lr_is_linear_in_the_sequence_length() -> None:
    assert scaled_lr(30.0, 70, 70) == pytest.approx(30.0)
    assert scaled_lr(30.0, 35, 70) == pytest.approx(15.0)
    assert scaled_lr(20.0, 42, 35) == pytest.approx(24.0)


def test_cosine_schedule_against_hand_computed_rates() -> None:
    from reglm.optim.schedules import CosineSchedule, CosineScheduleConfig

    cfg = CosineScheduleConfig(warmup_steps=4, warmup_init_lr=0.0, min_lr=0.1, period=4, t_mult=2, shrink=0.5)
    schedule = CosineSchedule(cfg, lr=1.0, finetune_lr=None)
    hand = {
        0: 0.0,
        2: 0.5,  # linear warm-up from 0 to the maximum 1
        4: 1.0,
        6: 0.1 + 0.9 * 0.5,
        7: 0.1 + 0.9 * (1 + math.cos(math.pi * 3 / 4)) / 2,  # cycle 0: 4 steps, 1 -> 0.1
        8: 0.5,
        12: 0.05 + 0.45 * 0.5,  # cycle 1: 8 steps, max and min halved
        16: 0.25,
        24: 0.025 + 0.225 * 0.5,  # cycle 2: 16 steps
    }
    for step, rate in hand.items():
        assert schedule.rate("main", 0, step) == pytest.approx(rate, abs=1e-12), step
    assert schedule.rate("finetune", 0, 100) == 0.1 and not schedule.epoch_end(False)


def test_the_papers_wikitext103_schedule_ends_its_fourth_cycle_at_286k_updates() -> None:
    from reglm.config import build_config
    from reglm.optim.schedules import CosineSchedule

    config = build_config("transformer-wt103-adp-t")
    schedule = CosineSchedule(config.train.schedule, config.train.optimizer.lr, None)
    assert config.train.max_steps == 16_000 + 18_000 * (1 + 2 + 4 + 8)
    assert schedule.rate("main", 0, 0) == pytest.approx(1e-7) and schedule.rate("main", 0, 16_000) == pytest.approx(1.0)
    end = config.train.max_steps
    assert schedule.rate("main", 0, end - 1) == pytest.approx(1e-5 * 0.75**3, rel=1e-3), (
        "the fourth cycle ends at its minimum"
    )
    assert schedule.rate("main", 0, 16_000 + 18_000) == pytest.approx(0.75), "each cycle starts at the shrunk maximum"


def test_plateau_stop_holds_at_the_drop_that_reaches_it_despite_rounding() -> None:
    """0.1 ** 3 is 0.0010000000000000002 in floating point: the third x0.1 drop still reaches 0.001."""
    schedule = DecaySchedule(DecayScheduleConfig(plateau_factor=0.1, plateau_stop=0.001), lr=1.0, finetune_lr=None)
    exhausted = []
    for improved in (True, False, True, False, False):
        schedule.epoch_end(improved, 1.0)
        exhausted.append(schedule.exhausted("main"))
    assert exhausted == [False, False, False, False, True]
    assert not schedule.exhausted("finetune")
    assert not DecaySchedule(DecayScheduleConfig(plateau_factor=0.1), lr=1.0, finetune_lr=None).exhausted("main")
    with pytest.raises(ReglmError, match="plateau_stop"):
        build_config(None, ["train.schedule.plateau_stop=1"])


def _stalling_config(epochs: int = 10) -> RunConfig:
    """A tiny run whose rate (1e-12) cannot move a parameter by one ulp: the first epoch improves
    on the initial infinite best, every later one gives the same validation score, so each drops
    the rate by 0.1 and plateau_stop=0.01 ends the main stage after epoch 1 + 2 = 3."""
    return build_config(
        "tiny",
        [
            "data.synthetic_sentences=120",
            f"train.epochs={epochs}",
            "train.lr=1e-12",
            "train.averaging=none",
            "train.finetune=false",
            "train.plateau_factor=0.1",
            "train.schedule.plateau_stop=0.01",
        ],
    )


def _epoch_events(run: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(row["epoch"], row["lr"]) for row in lines if row["event"] == "epoch"]


class _StopWhen(StopRequest):
    """A stop request raised, as SIGINT would, when ``condition(trainer)`` holds at a stop check
    (the end of every step and of every epoch)."""

    def __init__(self, condition: Callable[[Trainer], bool]) -> None:
        self.condition, self.trainer, self.raised = condition, None, None

    @property  # type: ignore[override]
    def signum(self) -> int | None:
        if self.raised is None and self.trainer is not None and self.condition(self.trainer):
            self.raised = signal.SIGINT
        return self.raised

    @signum.setter
    def signum(self, value: int | None) -> None:
        self.raised = value


def test_plateau_stop_ends_the_main_stage_and_a_resumed_run_ends_where_the_uninterrupted_one_did(
    tmp_path: Path,
) -> None:
    reference = tmp_path / "reference"
    results = train(_stalling_config(), reference, progress=False)
    assert [epoch for epoch, _ in _epoch_events(reference)] == [1, 2, 3]
    assert [lr for _, lr in _epoch_events(reference)] == pytest.approx([1e-12, 1e-12, 1e-13])
    assert math.isfinite(results["test"]["ppl"])
    # stopped mid-way through epoch 3 (scale 0.1 in state.pt), and right after epoch 3's drop (scale 0.01)
    conditions = {"mid": lambda t: t.epoch == 2 and t.position > 0, "end": lambda t: t.epoch == 3}
    for name, condition in conditions.items():
        run, stop = tmp_path / name, _StopWhen(condition)
        trainer = Trainer(_stalling_config(), run, load_corpus(_stalling_config()), progress=False, stop=stop)
        trainer.start()
        stop.trainer = trainer
        with pytest.raises(TrainingInterrupted):
            trainer.run()
        state = load_state(run / "state.pt")
        assert (state["stage"], state["epoch"], state["schedule"]["scale"]) == (
            ("main", 2, 0.1) if name == "mid" else ("main", 3, 0.1 * 0.1)
        )
        resumed = resume(run, progress=False)
        assert _epoch_events(run) == _epoch_events(reference), name
        assert resumed["test"]["ppl"] == pytest.approx(results["test"]["ppl"], rel=1e-6), name
