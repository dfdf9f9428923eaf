"""The subspace-distance study of Inan et al. (2017), section 6.2: eq. 6.1, the unit-norm
constraint, the study's structure, plot and bad options."""

from __future__ import annotations

import json

import pytest
import torch

from reglm.analysis.plots import plot_subspace_study
from reglm.errors import ReglmError
from reglm.objectives.augmented_loss import augmented_kl
from reglm.studies.subspace import SubspaceStudySpec, normalize_rows_, run_subspace_study, study_objective

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_spec(**kw) -> SubspaceStudySpec:
    base = dict(
        words=600,
        hidden=8,
        epochs=1,
        batch_size=4,
        bptt=10,
        betas=(0.0, 1.0),
        taus=(1.0, 10.0),
        tau_a=10.0,
        runs=1,
        seed=3,
    )
    return SubspaceStudySpec(**{**base, **kw})


def test_study_objective_is_eq_6_1() -> None:
    logits, targets, emb = torch.randn(12, 15), torch.randint(0, 15, (12,)), torch.randn(15, 4)
    nll = torch.nn.functional.cross_entropy(logits, targets)
    aug = augmented_kl(logits, targets, emb, 5.0).mean()
    torch.testing.assert_close(study_objective(logits, targets, emb, 0.0, 5.0), nll)
    torch.testing.assert_close(study_objective(logits, targets, emb, 1.0, 5.0), aug * 25 * 15)
    torch.testing.assert_close(study_objective(logits, targets, emb, 0.3, 5.0), 0.3 * aug * 25 * 15 + 0.7 * nll)


def test_normalize_rows() -> None:
    w = torch.randn(20, 5)
    w[3] = 0
    normalize_rows_(w)
    norms = w.norm(dim=1)
    assert float(norms[3]) == 0.0
    torch.testing.assert_close(norms[torch.arange(20) != 3], torch.ones(19))


def test_tiny_study_structure_and_plot(tmp_path) -> None:
    ids = torch.randint(0, 30, (2000,))
    spec = tiny_spec()
    result = run_subspace_study(ids, 30, spec)
    json.dumps(result)
    assert result["spec"]["lr"] == 2e-3 and result["spec"]["clip"] == 0.0 and result["vocab_size"] == 30
    # (beta=1, tau=10) is shared by both panels and trained once: 3 trainings
    assert [(t["beta"], t["tau"]) for t in result["trainings"]] == [(0.0, 10.0), (1.0, 10.0), (1.0, 1.0)]
    beta_panel, tau_panel = result["panels"]["beta"], result["panels"]["tau"]
    assert beta_panel["tau"] == 10.0 and beta_panel["x"] == [0.0, 1.0]
    assert tau_panel["beta"] == 1.0 and tau_panel["x"] == [1.0, 10.0]
    for panel in (beta_panel, tau_panel):
        assert [len(d) for d in panel["distances"]] == [1, 1]
        assert panel["mean"] == [d[0] for d in panel["distances"]] and panel["std"] == [0.0, 0.0]
        assert all(0.0 <= m <= 1.0 for m in panel["mean"]) and len(panel["final_nll"]) == 2
    assert beta_panel["distances"][1] == tau_panel["distances"][1]
    for t in result["trainings"]:
        assert 0 <= t["offset"] <= 2000 - 600 and t["seed"] == 3
        assert [c["epoch"] for c in t["curve"]] == [1] and t["distance"] == t["curve"][-1]["distance"]
        assert set(t["final"]) == {"nll", "ppl", "aug"} and t["seconds"] > 0
    plot_subspace_study(result, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_MAGIC
    # same seed, same numbers
    again = run_subspace_study(ids, 30, tiny_spec(betas=(0.0,), taus=(10.0,)))
    assert again["panels"]["beta"]["distances"][0] == beta_panel["distances"][0]


def test_study_with_sgd_and_two_runs() -> None:
    ids = torch.randint(0, 25, (1500,))
    result = run_subspace_study(
        ids, 25, tiny_spec(optimizer="sgd", runs=2, betas=(1.0,), taus=(10.0,), output_bias=False, encoder="awd-lstm")
    )
    assert result["spec"]["lr"] == 1.0 and result["spec"]["clip"] == 5.0
    assert len(result["trainings"]) == 2 and [len(d) for d in result["panels"]["beta"]["distances"]] == [2]
    assert result["panels"]["beta"]["std"][0] >= 0 and {t["seed"] for t in result["trainings"]} == {3, 4}


@pytest.mark.parametrize(
    "kw, option",
    [
        (dict(betas=(0.0, 1.5)), "--betas"),
        (dict(betas=()), "--betas"),
        (dict(taus=(0.0,)), "--taus"),
        (dict(taus=(float("nan"),)), "--taus"),
        (dict(tau_a=-1.0), "--tau-a"),
        (dict(runs=0), "--runs"),
        (dict(words=10), "--words"),
        (dict(words=100, batch_size=20), "--words"),
        (dict(epochs=0), "--epochs"),
        (dict(optimizer="rmsprop"), "--optimizer"),
        (dict(encoder="gru"), "--encoder"),
        (dict(lr=0.0), "--lr"),
        (dict(clip=-1.0), "--clip"),
        (dict(until_flat=-1), "--until-flat"),
    ],
)
def test_bad_specs_name_the_option(kw: dict, option: str) -> None:
    with pytest.raises(ReglmError, match=option):
        tiny_spec(**kw)


def test_until_flat_ends_a_training_whose_objective_stops_falling() -> None:
    """With a rate too small to move the weights the objective is flat from the first epoch: the
    training ends after ``until_flat`` more epochs and says so; at a working rate it runs to its cap."""
    ids = torch.randint(0, 25, (1500,))
    frozen = run_subspace_study(ids, 25, tiny_spec(epochs=50, betas=(1.0,), taus=(10.0,), lr=1e-12, until_flat=3))
    (training,) = frozen["trainings"]
    assert [point["epoch"] for point in training["curve"]] == [1, 2, 3, 4] and training["flat"] is True
    cycle = torch.arange(1500) % 25  # a text whose next word is a function of the last
    moving = run_subspace_study(cycle, 25, tiny_spec(epochs=4, betas=(1.0,), taus=(10.0,), lr=1e-2, until_flat=3))
    (training,) = moving["trainings"]
    assert len(training["curve"]) == 4 and training["flat"] is False
    assert training["curve"][-1]["objective"] < training["curve"][0]["objective"]


def test_until_flat_reads_the_whole_window_not_its_end_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """An objective that rises and comes back through an earlier value is not flat (the PTB runs
    rise for 9 epochs under the unit-norm constraint); one that stays within the band is. One SGD
    step an epoch, its objective scripted (same gradient, the value replaced)."""
    import reglm.studies.subspace as subspace

    values = iter([17.5, 43.5, 53.7, 60.8, 64.2, 58.0, 53.75, 40.0, 30.0, 29.99, 29.98, 29.98, 29.97, 29.97])
    monkeypatch.setattr(subspace, "embedding_subspace_distance", lambda model: 0.5)
    real_objective = subspace.study_objective

    def scripted(*args, **kwargs):
        loss = real_objective(*args, **kwargs)
        return loss - loss.detach() + next(values)

    monkeypatch.setattr(subspace, "study_objective", scripted)
    spec = tiny_spec(words=1000, batch_size=1, bptt=999, epochs=20, betas=(1.0,), taus=(10.0,), until_flat=4)
    (training,) = run_subspace_study(torch.arange(1000) % 25, 25, spec)["trainings"]
    assert [round(point["objective"], 2) for point in training["curve"]][-5:] == [30.0, 29.99, 29.98, 29.98, 29.97]
    assert training["flat"] is True and len(training["curve"]) == 13  # epoch 7 matches epoch 3: not flat


def test_bad_data() -> None:
    with pytest.raises(ReglmError, match="--words"):
        run_subspace_study(torch.randint(0, 30, (500,)), 30, tiny_spec())
    with pytest.raises(ReglmError, match="vocabulary"):
        run_subspace_study(torch.randint(0, 30, (2000,)), 20, tiny_spec())


def test_the_augmented_loss_alone_brings_w_into_the_embedding_span() -> None:
    """Figure 1's mechanism run to its end at a small size: 200 words, 8 units, J_aug alone
    (beta = 1, tau = 10). The text is a cycle through a random permutation of the words, so every
    next word is a function of the context and J_aug's optimum, W h + b = L u_y + const, puts
    span(W) inside span(L^T); without an output bias (section 4's b = 0), which would leave W's
    direction along the mean hidden state free. 1,000 Adam steps took the distance from 0.94 to
    0.105 on a 2-core Xeon (0.36 with the bias); beta = 0 stays at the random value 0.98, and
    beta = 1 is already well below it after 5 epochs (panel (a)'s order). The bounds leave room
    for another CPU's rounding of the same training."""
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(4000, dtype=torch.long)
    for t in range(1, 4000):
        ids[t] = order[ids[t - 1]]
    spec = dict(
        words=800, hidden=8, batch_size=4, bptt=10, taus=(10.0,), tau_a=10.0, runs=1, seed=1, lr=3e-3, output_bias=False
    )
    sweep = run_subspace_study(ids, 200, SubspaceStudySpec(epochs=5, betas=(0.0, 1.0), **spec))
    sweep = sweep["panels"]["beta"]["mean"]
    assert sweep[0] > 0.95 and sweep[1] < sweep[0] - 0.08
    long = run_subspace_study(ids, 200, SubspaceStudySpec(epochs=50, betas=(1.0,), **spec))
    assert long["panels"]["beta"]["mean"][0] < 0.2
