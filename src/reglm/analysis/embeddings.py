"""Diversity of an embedding matrix: nearest-neighbour distances, spectrum, effective rank, KDE.

These are the three views of Wang, Gong & Liu (2019, "Improving Neural Language Modeling via
Adversarial Training", Figure 1) on the output embedding ``W: (V, E)`` of a language model:

* the Euclidean distance of every word to its nearest *other* word, shown as a Gaussian kernel
  density estimate (panel a);
* the singular values of ``W`` divided by the largest one, on a log scale (panel b).

Two scalar summaries go with them: the *effective rank* of Roy & Vetterli (2007) and the number
of singular values above ``1e-3`` times the largest (the numerical rank at that tolerance).

All functions are pure; they accept tensors on any device and return float64 results.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reglm.progress import track

RANK_TOLERANCE = 1e-3
"""Relative tolerance of :func:`summary`'s ``numerical_rank``: singular values above it count."""

_U32 = 2.0**-24
"""Unit roundoff of float32."""


def nearest_neighbor_distances(
    weight: Tensor, block_size: int = 1024, candidates: int = 4, progress: bool = False
) -> Tensor:
    """``weight: (V, E)`` -> ``(V,)`` float64: each row's Euclidean distance to its nearest other row.

    Exact (to float64 rounding) without ever holding a ``V x V`` matrix. Rows are processed in
    blocks of ``block_size``:

    1. The matrix is centred on its column mean in float64 (distances do not change; a large
       common offset stops costing float32 precision) and cast to float32, ``X``.
    2. For a block of rows ``i``, ``r_ij = ||x_j||^2 - 2 <x_i, x_j>`` is one float32 matrix
       product ``(b, V)``; adding ``||x_i||^2`` gives the squared distance, which does not
       change the order within a row, so the ``candidates`` smallest ``r_ij`` (``j != i``) are
       the row's candidate neighbours.
    3. The candidates' distances are recomputed exactly in float64 from the differences of the
       original rows, and the smallest is kept.
    4. The float32 squared distances are off by at most ``err_i = 4 (E + 4) u (||x_i||^2 +
       max_j ||x_j||^2)`` (``u = 2^-24``; rounding of ``X``, of the norms and of the dot
       products). A row is certified when its exact minimum is at most the approximate squared
       distance of its last candidate minus ``err_i``: no other row can then be closer. For
       the rare rows that are not (ties below float32 resolution), every row whose approximate
       squared distance is at most the exact minimum plus ``err_i`` is recomputed exactly too.

    The error bound assumes IEEE float32 matrix products (not TF32 or bfloat16 reduced-precision
    modes). Duplicate rows get distance 0. Cost: ``V^2 E`` multiply-adds in float32 plus
    ``V * candidates * E`` in float64; memory ``block_size x V`` floats.

    Raises ValueError when ``weight`` is not a finite 2-D matrix with at least two rows, or when
    ``block_size`` or ``candidates`` is below 1.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a (V, E) matrix, got shape {tuple(weight.shape)}")
    num_rows, dim = weight.shape
    if num_rows < 2:
        raise ValueError(f"nearest neighbours need at least 2 rows, got {num_rows}")
    if block_size < 1 or candidates < 1:
        raise ValueError(f"block_size ({block_size}) and candidates ({candidates}) must be >= 1")
    exact = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(exact).all()):
        raise ValueError("the matrix holds NaN or infinite entries")
    approx = (exact - exact.mean(dim=0)).to(torch.float32)
    sq = approx.pow(2).sum(dim=1)
    sq64 = sq.to(torch.float64)
    err = 4 * (dim + 4) * _U32 * (sq64 + sq64.max())
    k = min(candidates, num_rows - 1)
    out = torch.empty(num_rows, dtype=torch.float64, device=weight.device)
    starts = range(0, num_rows, block_size)
    for start in track(starts, len(starts), "nearest neighbours", "block", progress):
        stop = min(start + block_size, num_rows)
        rows = torch.arange(start, stop, device=weight.device)
        partial = torch.addmm(sq.unsqueeze(0), approx[start:stop], approx.T, alpha=-2.0)
        partial[rows - start, rows] = math.inf
        values, index = partial.topk(k, dim=1, largest=False)
        best = (exact[start:stop].unsqueeze(1) - exact[index]).pow(2).sum(dim=2).min(dim=1).values
        if k < num_rows - 1:
            floor = sq64[start:stop] + values[:, -1].to(torch.float64) - err[start:stop]
            for local in torch.nonzero(best > floor).flatten().tolist():
                i = start + local
                limit = best[local] + err[i] - sq64[i]
                near = torch.nonzero(partial[local].to(torch.float64) <= limit).flatten()
                best[local] = (exact[near] - exact[i]).pow(2).sum(dim=1).min()
        out[start:stop] = best.sqrt()
    return out


def normalized_singular_values(weight: Tensor) -> Tensor:
    """``weight: (V, E)`` -> ``(min(V, E),)`` float64: singular values, descending, divided by the largest.

    Raises ValueError for a matrix that is not 2-D, is empty, is all zeros or holds NaN/inf.
    """
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"expected a non-empty (V, E) matrix, got shape {tuple(weight.shape)}")
    matrix = weight.detach().to(torch.float64)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("the matrix holds NaN or infinite entries")
    values = torch.linalg.svdvals(matrix)
    if float(values[0]) == 0.0:
        raise ValueError("the matrix is all zeros: its singular values cannot be normalized")
    return values / values[0]


def effective_rank(singular_values: Tensor) -> float:
    """Effective rank of Roy & Vetterli (2007): ``exp(H(p))`` with ``p = s / sum(s)``.

    ``s: (K,)`` non-negative singular values (any scale: normalizing does not change ``p``);
    ``H(p) = -sum_k p_k log p_k`` is the Shannon entropy in nats, with ``0 log 0 = 0``. It is
    ``k`` for ``k`` equal non-zero singular values and 1 for a rank-1 matrix; in between it
    measures how evenly the energy is spread over directions.

    Raises ValueError for an empty vector, negative or non-finite entries, or an all-zero one.
    """
    s = singular_values.detach().to(torch.float64).flatten()
    if s.numel() == 0 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("singular values must be a non-empty vector of finite, non-negative numbers")
    total = s.sum()
    if float(total) == 0.0:
        raise ValueError("all singular values are zero: the effective rank is undefined")
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def scott_bandwidth(samples: np.ndarray | Tensor) -> float:
    """Scott's rule for a 1-D Gaussian KDE: ``h = n^(-1/5) * std(samples)`` (``std`` with ``ddof=1``).

    Raises ValueError for fewer than two samples or samples without spread (``h`` would be 0).
    """
    x = _as_float64(samples)
    if x.size < 2:
        raise ValueError(f"a bandwidth needs at least 2 samples, got {x.size}")
    std = float(x.std(ddof=1))
    if not std > 0:
        raise ValueError("all samples are equal: Scott's bandwidth is 0; give a bandwidth")
    return x.size ** (-0.2) * std


def gaussian_kde(
    samples: np.ndarray | Tensor,
    grid: np.ndarray | Tensor,
    bandwidth: float | None = None,
    chunk_elements: int = 1 << 20,
) -> np.ndarray:
    """Gaussian kernel density estimate of 1-D ``samples: (n,)`` evaluated at ``grid: (G,)`` -> ``(G,)`` float64.

    ``f(g) = 1 / (n h sqrt(2 pi)) * sum_i exp(-(g - x_i)^2 / (2 h^2))`` with ``h = bandwidth``,
    by default :func:`scott_bandwidth`. Samples are summed in chunks of about ``chunk_elements``
    ``(chunk, G)`` kernel values, so memory stays bounded for any ``n``.

    Raises ValueError for no samples or a bandwidth that is not a positive number.
    """
    x = _as_float64(samples)
    g = _as_float64(grid)
    if x.size == 0:
        raise ValueError("a density estimate needs at least one sample")
    h = scott_bandwidth(x) if bandwidth is None else float(bandwidth)
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"bandwidth must be a positive number, got {h}")
    density = np.zeros(g.size, dtype=np.float64)
    chunk = max(1, chunk_elements // max(g.size, 1))
    for start in range(0, x.size, chunk):
        z = (g[None, :] - x[start : start + chunk, None]) / h
        density += np.exp(-0.5 * z * z).sum(axis=0)
    return density / (x.size * h * math.sqrt(2 * math.pi))


def summary(distances: Tensor, singular_values: Tensor) -> dict[str, Any]:
    """Scalar summary of ``distances: (V,)`` (nearest-neighbour) and ``singular_values: (K,)``.

    Keys: ``nn_mean``, ``nn_median``, ``nn_min``, ``nn_max`` (the median averages the two middle
    values for even ``V``), ``effective_rank`` (:func:`effective_rank`) and ``numerical_rank``:
    the number of singular values above ``RANK_TOLERANCE`` (1e-3) times the largest.
    """
    d = _as_float64(distances)
    s = _as_float64(singular_values)
    if d.size == 0 or s.size == 0:
        raise ValueError("summary needs at least one distance and one singular value")
    return {
        "nn_mean": float(d.mean()),
        "nn_median": float(np.median(d)),
        "nn_min": float(d.min()),
        "nn_max": float(d.max()),
        "effective_rank": effective_rank(torch.from_numpy(s)),
        "numerical_rank": int((s > RANK_TOLERANCE * s.max()).sum()),
    }


def _as_float64(values: np.ndarray | Tensor) -> np.ndarray:
    """Any 1-D tensor or array-like -> a flat float64 numpy array (on the CPU)."""
    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)
