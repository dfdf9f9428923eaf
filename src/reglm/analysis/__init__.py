"""Analyses of trained models: the embedding diversity of Wang, Gong & Liu (2019), Figure 1.

:mod:`reglm.analysis.embeddings` holds the pure measures (nearest-neighbour distances, normalized
singular values, effective rank, Gaussian KDE), :mod:`reglm.analysis.runs` reads a run directory
and :mod:`reglm.analysis.plots` draws every figure of the toolkit; ``reglm analyze`` ties them together.
"""

from reglm.analysis.embeddings import (
    effective_rank,
    gaussian_kde,
    nearest_neighbor_distances,
    normalized_singular_values,
    scott_bandwidth,
    summary,
)
from reglm.analysis.runs import analyze_run, output_embedding, read_curve

__all__ = [
    "analyze_run",
    "effective_rank",
    "gaussian_kde",
    "nearest_neighbor_distances",
    "normalized_singular_values",
    "output_embedding",
    "read_curve",
    "scott_bandwidth",
    "summary",
]
