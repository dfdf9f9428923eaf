"""Subspace distance (Inan et al. appendix B) and the section-6.2 study, on small problems."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reglm.analysis.subspace import embedding_subspace_distance, orthonormal_basis, subspace_distance
from reglm.config import ModelConfig
from reglm.errors import ReglmError
from reglm.models import LanguageModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reference_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Independent: numpy QR bases, cosines of the principal angles from the SVD of ``U^T V``,
    ``sqrt(mean(sin^2))`` over the ``c2`` directions of ``span(y)`` (unpaired ones count as orthogonal)."""
    u, _ = np.linalg.qr(x.numpy().astype(np.float64))
    v, _ = np.linalg.qr(y.numpy().astype(np.float64))
    cos = np.linalg.svd(u.T @ v, compute_uv=False)
    sin2 = np.concatenate([1.0 - cos**2, np.ones(v.shape[1] - cos.size)])
    return math.sqrt(float(sin2.mean()))


def invertible(c: int) -> torch.Tensor:
    return torch.randn(c, c, dtype=torch.float64) + 3 * torch.eye(c, dtype=torch.float64)


def test_same_span_is_zero() -> None:
    x = torch.randn(50, 6, dtype=torch.float64)
    assert subspace_distance(x, x @ invertible(6)) < 1e-7
    assert subspace_distance(x, x) < 1e-7


def test_orthogonal_spans_are_one() -> None:
    q, _ = torch.linalg.qr(torch.randn(40, 9, dtype=torch.float64))
    x, y = q[:, :4] @ invertible(4), q[:, 4:] @ invertible(5)
    assert subspace_distance(x, y) == pytest.approx(1.0, abs=1e-12)
    assert subspace_distance(y, x) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n, c1, c2", [(30, 5, 5), (30, 7, 4), (30, 3, 6), (100, 10, 10), (8, 8, 3)])
def test_matches_principal_angles_and_is_basis_invariant(n: int, c1: int, c2: int) -> None:
    x, y = torch.randn(n, c1, dtype=torch.float64), torch.randn(n, c2, dtype=torch.float64)
    d = subspace_distance(x, y)
    assert 0.0 <= d <= 1.0
    assert d**2 == pytest.approx(
        reference_distance(x, y) ** 2, abs=1e-12
    )  # squares: d ~ 1e-8 when span(y) lies in span(x)
    assert subspace_distance(x @ invertible(c1), y @ invertible(c2)) ** 2 == pytest.approx(d**2, abs=1e-10)
    if c1 == c2:
        assert subspace_distance(y, x) == pytest.approx(d, abs=1e-12)


def test_range_and_random_subspace_value() -> None:
    values = [subspace_distance(torch.randn(200, 8), torch.randn(200, 8)) for _ in range(20)]
    assert all(0.0 <= v <= 1.0 for v in values)
    # two random c-dimensional subspaces of R^n: d^2 ~ 1 - c/n
    assert abs(sum(values) / len(values) - math.sqrt(1 - 8 / 200)) < 0.01


def test_rank_deficient_matrices_use_their_column_space() -> None:
    b = torch.randn(30, 3, dtype=torch.float64)
    x = b @ torch.randn(3, 5, dtype=torch.float64)  # 5 columns, rank 3
    basis = orthonormal_basis(x)
    assert basis.shape == (30, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3, dtype=torch.float64))
    assert subspace_distance(x, b) < 1e-7 and subspace_distance(b, x) < 1e-7
    y = torch.randn(30, 3, dtype=torch.float64)
    assert subspace_distance(y, x) == pytest.approx(subspace_distance(y, b), abs=1e-10)
    wide = torch.randn(4, 7, dtype=torch.float64)  # more columns than rows: spans all of R^4
    assert (
        orthonormal_basis(wide).shape == (4, 4)
        and subspace_distance(wide, torch.randn(4, 2, dtype=torch.float64)) < 1e-7
    )
    with pytest.raises(ValueError, match="zeros"):
        subspace_distance(torch.zeros(10, 2), y[:10])
    with pytest.raises(ValueError, match="same n"):
        subspace_distance(torch.randn(10, 2), torch.randn(11, 2))


# ---------------------------------------------------------------- on a language model


def test_tied_model_has_distance_zero() -> None:
    model = LanguageModel(ModelConfig.build(emb_size=8, hidden_size=12, tie_weights=True), 60)
    assert embedding_subspace_distance(model) < 1e-6


def test_untied_random_model_is_near_the_random_value() -> None:
    model = LanguageModel(ModelConfig.build(emb_size=8, hidden_size=8, tie_weights=False), 200)
    assert abs(embedding_subspace_distance(model) - math.sqrt(1 - 8 / 200)) < 0.03


def test_mixture_of_softmaxes_is_refused() -> None:
    model = LanguageModel(
        ModelConfig.build(emb_size=6, hidden_size=10, last_hidden_size=9, output="mos", n_experts=2, tie_weights=False),
        23,
    )
    with pytest.raises(ReglmError, match="mixture of softmaxes"):
        embedding_subspace_distance(model)


# ---------------------------------------------------------------- the study
