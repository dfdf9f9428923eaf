"""NT-ASGD: the non-monotone trigger (both variants) and the parameter averager."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from reglm.errors import ReglmError
from reglm.optim.ntasgd import NonMonotoneTrigger, ParameterAverager


def _fires(values: list[float], n: int, variant: str) -> list[bool]:
    trigger = NonMonotoneTrigger(n, variant)
    return [trigger.update(v) for v in values]


def _first(flags: list[bool]) -> int | None:
    return flags.index(True) if True in flags else None


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------ trigger


def test_paper_fires_and_reference_does_not_when_only_the_recent_window_is_better() -> None:
    # t = 3 > n = 2; recent window (5, 4) has min 4 < 4.5; the old best (10) is > 4.5.
    values = [10.0, 5.0, 4.0, 4.5]
    assert _fires(values, 2, "paper") == [False, False, False, True]
    assert _fires(values, 2, "reference") == [False, False, False, False]


def test_reference_fires_and_paper_does_not_when_only_the_old_best_is_better() -> None:
    # Old best (1) < 3 < min of the recent window (5, 6).
    values = [1.0, 5.0, 6.0, 3.0]
    assert _fires(values, 2, "reference") == [False, False, False, True]
    assert _fires(values, 2, "paper") == [False, False, False, False]


def test_exact_firing_epoch_on_a_plateau() -> None:
    # Improves until index 3 (7.0), then stalls at 7.5.
    values = [10.0, 9.0, 8.0, 7.0] + [7.5] * 6
    reference = _fires(values, 3, "reference")
    # Needs v > min(l_0 .. l_{t-4}): the best 7.0 (index 3) joins that window at t = 7.
    assert _first(reference) == 7
    assert reference[7:] == [True] * 3
    # Needs v > min(l_{t-3} .. l_{t-1}): the first stalled value already fails the window.
    assert _first(_fires(values, 3, "paper")) == 4


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_never_fires_while_improving_or_on_exact_ties(variant: str) -> None:
    assert not any(_fires([10.0 - i for i in range(20)], 2, variant))
    assert not any(_fires([5.0] * 20, 2, variant))
    assert not any(_fires([3.0, 2.0, 1.0, float("nan"), float("nan")], 1, variant))


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_needs_more_than_n_logged_values(variant: str) -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # every value is worse than everything before
    assert _first(_fires(values, 5, variant)) == 6


@pytest.mark.parametrize("variant", ["reference", "paper"])
def test_trigger_state_round_trip_resumes_identically(variant: str) -> None:
    values = [9.0, 7.0, 6.5, 6.0, 6.2, 5.9, 6.1, 6.3, 6.0, 6.4, 6.6, 5.8, 6.9]
    expected = _fires(values, 3, variant)

    first = NonMonotoneTrigger(3, variant)
    head = [first.update(v) for v in values[:6]]
    state = _roundtrip(first.state_dict())
    assert state == {"log": values[:6]}

    second = NonMonotoneTrigger(3, variant)
    second.load_state_dict(state)
    assert head + [second.update(v) for v in values[6:]] == expected
    assert second.log == tuple(values)


def test_trigger_rejects_bad_options_and_damaged_state() -> None:
    with pytest.raises(ReglmError, match="reference, paper"):
        NonMonotoneTrigger(5, "nope")
    with pytest.raises(ReglmError, match=">= 1"):
        NonMonotoneTrigger(0)
    with pytest.raises(ReglmError, match="damaged"):
        NonMonotoneTrigger(5).load_state_dict({"log": "oops"})


# ------------------------------------------------------------------ averager


def _sgd_iterates(
    model: nn.Module, steps: int, start_at: int, averager: ParameterAverager
) -> list[dict[str, torch.Tensor]]:
    """Run ``steps`` SGD steps; averaging starts at the iterate after ``start_at`` steps. Returns the
    averaged iterates."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    y = torch.randn(16, 3)
    iterates = []
    for step in range(steps + 1):
        if step == start_at:
            averager.start(model.parameters())
        elif step > start_at:
            averager.update(model.parameters())
        if step >= start_at:
            iterates.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if step == steps:
            break
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return iterates


def test_average_equals_the_mean_of_the_iterates_since_start() -> None:
    model = nn.Linear(4, 3)
    averager = ParameterAverager()
    iterates = _sgd_iterates(model, steps=12, start_at=4, averager=averager)
    assert averager.active and averager.count == len(iterates) == 9

    averaged = averager.averaged_state(model)
    for name in ("weight", "bias"):
        expected = torch.stack([it[name].double() for it in iterates]).mean(0).float()
        torch.testing.assert_close(averaged[name], expected, rtol=1e-6, atol=1e-7)
        assert averaged[name].dtype == torch.float32
    # The iterates really moved, and the training model still holds the last one.
    assert not torch.allclose(iterates[0]["weight"], iterates[-1]["weight"])
    torch.testing.assert_close(model.weight.detach(), iterates[-1]["weight"], rtol=0, atol=0)


def test_start_equals_the_current_weights_and_restart_resets() -> None:
    model = nn.Linear(4, 3)
    averager = ParameterAverager()
    assert not averager.active and averager.count == 0
    averager.start(model.parameters())
    assert averager.count == 1
    torch.testing.assert_close(averager.averaged_state(model)["weight"], model.weight.detach(), rtol=0, atol=0)

    with torch.no_grad():
        model.weight.add_(1.0)
    averager.update(model.parameters())
    averager.start(model.parameters())  # fine-tuning: ASGD restarts with T = 0
    assert averager.count == 1
    torch.testing.assert_close(averager.averaged_state(model)["weight"], model.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_running_mean_precision(dtype: torch.dtype, tolerance: float) -> None:
    g = torch.Generator().manual_seed(3)
    averager = ParameterAverager(dtype=dtype)
    total = torch.zeros(64, dtype=torch.float64)
    steps = 5_000
    for k in range(steps):
        w = (1.0 + 0.01 * torch.randn(64, generator=g)).float()
        total += w.double()
        if k == 0:
            averager.start([w])
        else:
            averager.update([w])
    (average,) = averager.state_dict()["avg"]
    assert average.dtype == dtype
    torch.testing.assert_close(average.double(), total / steps, rtol=0, atol=tolerance)


def test_averager_state_round_trip_resumes_identically() -> None:
    model = nn.Linear(4, 3)
    iterates = [[torch.randn_like(p) for p in model.parameters()] for _ in range(8)]

    uninterrupted = ParameterAverager()
    uninterrupted.start(iterates[0])
    for it in iterates[1:]:
        uninterrupted.update(it)

    first = ParameterAverager()
    assert _roundtrip(first.state_dict()) == {"count": 0, "avg": []}
    first.start(iterates[0])
    for it in iterates[1:5]:
        first.update(it)
    state = _roundtrip(first.state_dict())
    assert state["count"] == 5 and all(isinstance(t, torch.Tensor) for t in state["avg"])

    resumed = ParameterAverager()
    resumed.load_state_dict(state)
    assert resumed.active and resumed.count == 5
    for it in iterates[5:]:
        resumed.update(it)
    assert resumed.count == uninterrupted.count == 8
    for a, b in zip(resumed.state_dict()["avg"], uninterrupted.state_dict()["avg"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.norm = nn.BatchNorm1d(4)
        self.decoder = nn.Linear(4, 10)
        self.decoder.weight = self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.embedding(ids)))


def test_tied_parameters_are_averaged_once_and_stay_tied() -> None:
    model = _Tied()
    averager = ParameterAverager()
    iterates = _sgd_iterates_tied(model, averager)
    # embedding/decoder weight (once), norm weight, norm bias, decoder bias
    assert len(averager.state_dict()["avg"]) == 4

    state = averager.averaged_state(model)
    expected = torch.stack([it.double() for it in iterates]).mean(0).float()
    torch.testing.assert_close(state["embedding.weight"], expected, rtol=1e-6, atol=1e-7)
    assert state["decoder.weight"] is state["embedding.weight"]
    # Buffers are copies of the training model's, not views of them.
    torch.testing.assert_close(state["norm.running_mean"], model.norm.running_mean, rtol=0, atol=0)
    assert state["norm.running_mean"].data_ptr() != model.norm.running_mean.data_ptr()
    assert state["norm.num_batches_tracked"] == model.norm.num_batches_tracked

    evaluator = copy.deepcopy(model)
    evaluator.load_state_dict(state)
    assert evaluator.decoder.weight is evaluator.embedding.weight
    torch.testing.assert_close(evaluator.embedding.weight.detach(), expected, rtol=1e-6, atol=1e-7)


def _sgd_iterates_tied(model: _Tied, averager: ParameterAverager) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, 10, (32,))
    iterates = []
    for step in range(6):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(ids), ids).backward()
        optimizer.step()
        if step == 2:
            averager.start(model.parameters())
        elif step > 2:
            averager.update(model.parameters())
        if step >= 2:
            iterates.append(model.embedding.weight.detach().clone())
    return iterates


def test_load_into_fills_a_separate_instance_and_leaves_the_training_model_alone() -> None:
    model = nn.Linear(4, 3)
    averager = ParameterAverager()
    _sgd_iterates(model, steps=6, start_at=1, averager=averager)
    before = copy.deepcopy(model.state_dict())

    evaluator = nn.Linear(4, 3)
    averager.load_into(evaluator)
    state = averager.averaged_state(model)
    torch.testing.assert_close(evaluator.state_dict(), state, rtol=0, atol=0)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)
    assert not torch.allclose(evaluator.weight, model.weight)


def test_averager_misuse_is_reported() -> None:
    model = nn.Linear(4, 3)
    averager = ParameterAverager()
    with pytest.raises(RuntimeError, match="before start"):
        averager.update(model.parameters())
    averager.start(model.parameters())
    with pytest.raises(ValueError, match="do not match"):
        averager.update(nn.Linear(5, 3).parameters())
    with pytest.raises(ValueError, match="do not match"):
        averager.load_into(nn.Linear(4, 3, bias=False))
    with pytest.raises(ReglmError, match="damaged"):
        ParameterAverager().load_state_dict({"count": 3, "avg": []})
