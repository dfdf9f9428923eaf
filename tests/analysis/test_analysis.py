"""Embedding-diversity analysis: the measures against brute-force references, and `reglm analyze` end to end."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from reglm.analysis import (
    effective_rank,
    gaussian_kde,
    nearest_neighbor_distances,
    normalized_singular_values,
    scott_bandwidth,
    summary,
)
from reglm.analysis import runs as analysis_runs
from reglm.cli import main
from reglm.config import build_config
from reglm.errors import ReglmError
from reglm.modeldir import load_model_dir
from reglm.train.run import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_force_nn(weight: torch.Tensor) -> torch.Tensor:
    """Reference: every pairwise distance from the row differences in float64, self excluded."""
    w = weight.to(torch.float64)
    d = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")
    d.fill_diagonal_(math.inf)
    return d.min(dim=1).values


# ---------------------------------------------------------------- nearest-neighbour distances


@pytest.mark.parametrize(
    "rows, dim, block_size, dtype",
    [
        (50, 8, 7, torch.float32),
        (33, 5, 33, torch.float64),
        (64, 16, 1000, torch.float32),
        (101, 3, 10, torch.float64),
        (2, 4, 1, torch.float32),
    ],
)
def test_nn_distances_match_brute_force(rows: int, dim: int, block_size: int, dtype: torch.dtype) -> None:
    weight = torch.randn(rows, dim, dtype=dtype)
    got = nearest_neighbor_distances(weight, block_size=block_size)
    assert got.dtype == torch.float64 and got.shape == (rows,)
    torch.testing.assert_close(got, brute_force_nn(weight), rtol=1e-12, atol=1e-14)


def test_duplicate_rows_have_distance_zero() -> None:
    weight = torch.randn(40, 6)
    weight[7] = weight[3]
    weight[20] = weight[21] = weight[22] = weight[5]
    got = nearest_neighbor_distances(weight, block_size=9)
    torch.testing.assert_close(got, brute_force_nn(weight), rtol=1e-12, atol=1e-14)
    assert set(torch.nonzero(got == 0).flatten().tolist()) == {3, 7, 5, 20, 21, 22}


def test_large_common_offset_keeps_full_precision() -> None:
    weight = 1e4 + 1e-2 * torch.randn(60, 12, dtype=torch.float64)
    expected = brute_force_nn(weight)
    x = weight.float()
    naive = (
        (x.pow(2).sum(1, keepdim=True) + x.pow(2).sum(1) - 2 * x @ x.T)
        .fill_diagonal_(math.inf)
        .clamp_min(0)
        .min(dim=1)
        .values.sqrt()
    )
    assert float(((naive.double() - expected).abs() / expected).max()) > 0.1, (
        "the float32 expansion alone must fail on this input"
    )
    torch.testing.assert_close(nearest_neighbor_distances(weight, block_size=16), expected, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("candidates", [1, 4])
def test_ties_below_float32_resolution_are_resolved_exactly(candidates: int) -> None:
    """Row 0 sits at the origin; rows 1..32 on orthogonal axes at distance 1 + |j - 16| * 1e-9.

    In float32 all 32 are the same distance, so the approximate candidates are arbitrary; the
    certification step must find that the nearest is row 16 (distance exactly 1).
    """
    axes = 32
    weight = torch.zeros(1 + axes + 20, 40, dtype=torch.float64)
    for j in range(1, axes + 1):
        weight[j, j - 1] = 1.0 + abs(j - 16) * 1e-9
    weight[axes + 1 :] = 5.0 + torch.randn(20, 40, dtype=torch.float64)
    got = nearest_neighbor_distances(weight, block_size=8, candidates=candidates)
    torch.testing.assert_close(got, brute_force_nn(weight), rtol=1e-14, atol=0.0)
    assert float(got[0]) == 1.0


def test_nn_distances_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        nearest_neighbor_distances(torch.randn(1, 4))
    with pytest.raises(ValueError, match="matrix"):
        nearest_neighbor_distances(torch.randn(5))
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbor_distances(torch.tensor([[0.0, math.nan], [1.0, 2.0]]))


# ---------------------------------------------------------------- spectrum and effective rank


def test_normalized_singular_values_match_svdvals() -> None:
    weight = torch.randn(70, 12)
    reference = torch.linalg.svdvals(weight.double())
    got = normalized_singular_values(weight)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, reference / reference.max(), rtol=1e-10, atol=1e-12)
    assert float(got[0]) == 1.0 and bool((got[:-1] >= got[1:]).all())
    with pytest.raises(ValueError, match="all zeros"):
        normalized_singular_values(torch.zeros(4, 3))


@pytest.mark.parametrize("k", [1, 3, 6])
def test_effective_rank_of_k_equal_singular_values_is_k(k: int) -> None:
    u = torch.linalg.qr(torch.randn(20, 6, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    weight = 2.5 * u[:, :k] @ v[:, :k].T
    assert effective_rank(normalized_singular_values(weight)) == pytest.approx(k, abs=1e-6)


def test_effective_rank_of_rank_one_matrix_is_one_and_formula() -> None:
    weight = torch.outer(torch.randn(30, dtype=torch.float64), torch.randn(8, dtype=torch.float64))
    assert effective_rank(normalized_singular_values(weight)) == pytest.approx(1.0, abs=1e-6)
    p = [0.75, 0.25]
    assert effective_rank(torch.tensor([3.0, 1.0, 0.0])) == pytest.approx(
        math.exp(-sum(q * math.log(q) for q in p)), rel=1e-12
    )
    with pytest.raises(ValueError):
        effective_rank(torch.tensor([1.0, -0.5]))


def test_summary_values() -> None:
    out = summary(torch.tensor([4.0, 1.0, 3.0, 2.0]), torch.tensor([1.0, 0.5, 2e-3, 5e-4, 0.0]))
    assert (out["nn_mean"], out["nn_median"], out["nn_min"], out["nn_max"]) == (2.5, 2.5, 1.0, 4.0)
    assert out["numerical_rank"] == 3
    assert out["effective_rank"] == pytest.approx(effective_rank(torch.tensor([1.0, 0.5, 2e-3, 5e-4])), rel=1e-12)


# ---------------------------------------------------------------- kernel density estimate


def test_scott_bandwidth_formula() -> None:
    samples = np.random.default_rng(1).gamma(2.0, 0.5, size=250)
    assert scott_bandwidth(samples) == pytest.approx(250 ** (-1 / 5) * statistics.stdev(samples.tolist()), rel=1e-12)
    with pytest.raises(ValueError, match="equal"):
        scott_bandwidth(np.ones(5))


def test_kde_integrates_to_one() -> None:
    samples = torch.distributions.Gamma(3.0, 4.0).sample((2000,)).double()
    grid = np.linspace(-5.0, 10.0, 6001)
    density = gaussian_kde(samples, grid)
    assert density.shape == grid.shape and density.min() >= 0
    assert float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid))) == pytest.approx(1.0, abs=1e-6)


def test_kde_matches_direct_sum_of_gaussians() -> None:
    samples = [0.1, 0.4, 0.45, 1.3, 2.0]
    grid = [-0.5, 0.0, 0.42, 1.0, 3.0]
    h = 0.3
    expected = [
        sum(math.exp(-((g - x) ** 2) / (2 * h * h)) / (h * math.sqrt(2 * math.pi)) for x in samples) / len(samples)
        for g in grid
    ]
    np.testing.assert_allclose(gaussian_kde(samples, grid, h, chunk_elements=7), expected, rtol=1e-12)
    default = gaussian_kde(np.array(samples), np.array(grid))
    np.testing.assert_allclose(default, gaussian_kde(samples, grid, scott_bandwidth(np.array(samples))), rtol=1e-12)


# ---------------------------------------------------------------- `reglm analyze` end to end


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run: 2 main epochs, then 1 fine-tuning epoch."""
    run = tmp_path_factory.mktemp("analysis") / "tiny-run"
    train(
        build_config("tiny", ["train.epochs=2", "train.finetune=true", "train.finetune_epochs=1"]), run, progress=False
    )
    return run


def _epoch_events(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "epoch"]


def test_analyze_two_runs(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main_only = tmp_path / "main-only"
    shutil.copytree(run_dir, main_only)
    records = [json.loads(line) for line in (main_only / "metrics.jsonl").read_text().splitlines()]
    kept = [r for r in records if r.get("stage") != "finetune" and r.get("event") != "stage"]
    (main_only / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))

    out = tmp_path / "out"
    code = main(["analyze", str(run_dir), str(main_only), "--out", str(out), "--labels", "a, b"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert printed.splitlines()[1].split()[0] == "a" and printed.splitlines()[2].split()[0] == "b"
    assert (out / "embedding-diversity.png").read_bytes()[:8] == PNG_MAGIC

    data = json.loads((out / "embedding-diversity.json").read_text())
    first, second = data["runs"]
    model, _, vocab = load_model_dir(run_dir / "best")
    weight = model.output.weight.detach()
    events = _epoch_events(run_dir)
    assert [first["label"], second["label"]] == ["a", "b"]
    assert first["vocab_size"] == second["vocab_size"] == len(vocab) == weight.size(0)
    assert first["embedding_dim"] == weight.size(1) == len(first["singular_values"])
    assert len(first["epochs"]) == len(events) == 3
    assert [e["global_epoch"] for e in first["epochs"]] == [1, 2, 3]
    assert [(e["stage"], e["epoch"]) for e in first["epochs"]] == [("main", 1), ("main", 2), ("finetune", 1)]
    assert [e["valid_ppl"] for e in first["epochs"]] == [e["valid_ppl"] for e in events]
    assert first["finetune_start_epoch"] == 3
    assert len(second["epochs"]) == 2 and second["finetune_start_epoch"] is None
    reference = brute_force_nn(weight)
    assert first["summary"]["nn_mean"] == pytest.approx(float(reference.mean()), rel=1e-12)
    assert first["summary"]["best_valid_ppl"] == pytest.approx(min(e["valid_ppl"] for e in events), rel=1e-12)
    assert len(first["kde"]["grid"]) == len(first["kde"]["density"]) == analysis_runs.KDE_POINTS


def test_analyze_json_output_and_default_labels(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    code = main(["analyze", str(run_dir), "--out", str(out), "--checkpoint", "last", "--json"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(printed)
    (row,) = result["runs"]
    assert row["label"] == "tiny-run" and row["checkpoint"] == "last"
    saved = json.loads((out / "embedding-diversity.json").read_text())["runs"][0]
    assert row["effective_rank"] == saved["summary"]["effective_rank"]
    assert 1 <= row["effective_rank"] <= row["numerical_rank"] <= row["embedding_dim"]


def _expect_error(capsys: pytest.CaptureFixture, out: Path, fragment: str, *argv: str) -> None:
    """Exit 2, one `reglm: error:` line naming the problem, and --out left exactly as it was."""
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = main(["analyze", *argv, "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("reglm: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert fragment in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_analyze_bad_input(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "embedding-diversity.json").write_text("previous result\n")
    _expect_error(capsys, out, "does not exist", str(tmp_path / "missing"))

    no_metrics = tmp_path / "no-metrics"
    shutil.copytree(run_dir, no_metrics)
    (no_metrics / "metrics.jsonl").unlink()
    _expect_error(capsys, out, "metrics.jsonl is missing", str(run_dir), str(no_metrics))

    no_epochs = tmp_path / "no-epochs"
    shutil.copytree(run_dir, no_epochs)
    (no_epochs / "metrics.jsonl").write_text('{"event": "step", "step": 1}\n')
    _expect_error(capsys, out, "no epoch events", str(no_epochs))

    no_best = tmp_path / "no-best"
    shutil.copytree(run_dir, no_best)
    shutil.rmtree(no_best / "best")
    _expect_error(capsys, out, "no best/ model", str(no_best))

    _expect_error(
        capsys, out, "--labels gives 3 label(s) for 2 run(s)", str(run_dir), str(run_dir), "--labels", "a,b,c"
    )
    assert sorted(p.name for p in out.iterdir()) == ["embedding-diversity.json"]


def test_run_without_output_matrix_is_an_error(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(analysis_runs, "load_model_dir", lambda *_: (SimpleNamespace(output=nn.Identity()), None, None))
    with pytest.raises(ReglmError, match="no output embedding to analyze"):
        analysis_runs.output_embedding(run_dir)


def test_analyze_top_words_only(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["analyze", str(run_dir), "--out", str(out), "--top", "50", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    model, _, vocab = load_model_dir(run_dir / "best")
    top = model.output.weight.detach()[:50]
    assert row["analyzed_words"] == 50 and row["vocab_size"] == len(vocab)
    assert row["nn_mean"] == pytest.approx(float(brute_force_nn(top).mean()), rel=1e-12)
    assert main(["analyze", str(run_dir), "--out", str(tmp_path / "bad"), "--top", "1"]) == 2
    assert "--top 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()
