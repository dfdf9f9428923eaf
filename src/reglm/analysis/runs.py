"""Reading a run directory for the embedding-diversity analysis, and analyzing one run.

A run (``reglm train --out RUN``) holds ``best/`` and ``last/`` model directories and
``metrics.jsonl``. :func:`analyze_run` loads the chosen checkpoint's output embedding
``model.output.weight: (V, E)`` (the input embedding too when the model is tied), computes the
measures of :mod:`reglm.analysis.embeddings` and reads the per-epoch perplexity curve. Every
problem with the run is a :class:`~reglm.errors.ReglmError` naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reglm.analysis.embeddings import (
    gaussian_kde,
    nearest_neighbor_distances,
    normalized_singular_values,
    scott_bandwidth,
    summary,
)
from reglm.errors import ReglmError
from reglm.metrics import read_metrics
from reglm.modeldir import load_model_dir
from reglm.rundir import MODEL_FILE

METRICS_FILE = "metrics.jsonl"
KDE_POINTS = 512
"""Grid points of the nearest-neighbour density."""
KDE_MARGIN = 3.0
"""The density grid reaches this many bandwidths beyond the smallest and largest distance (not below 0)."""


def read_curve(run_dir: Path | str) -> dict[str, Any]:
    """Per-epoch perplexities of a run from its ``metrics.jsonl``.

    Returns ``{"epochs": [{stage, epoch, global_epoch, train_ppl, valid_ppl}, ...],
    "finetune_start_epoch": int | None}``. ``global_epoch`` numbers the epochs 1, 2, ...
    across the main and fine-tuning stages (the log restarts ``epoch`` at 1 for fine-tuning);
    ``finetune_start_epoch`` is the global number of the first fine-tuning epoch, taken from the
    ``stage`` event that starts fine-tuning, or None when the run never fine-tuned.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ReglmError(
            f"{path} is missing: the analysis needs the run's training log; give a run directory written by `reglm "
            "train` (not a bare model directory)"
        )
    try:
        records = read_metrics(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ReglmError(f"{path} cannot be read ({exc}); restore the run's training log") from None
    epochs: list[dict[str, Any]] = []
    finetune_start = None
    for record in records:
        if not isinstance(record, dict):
            continue
        if record.get("event") == "stage" and record.get("stage") == "finetune" and finetune_start is None:
            finetune_start = len(epochs) + 1
        elif record.get("event") == "epoch":
            try:
                entry = {
                    "stage": str(record["stage"]),
                    "epoch": int(record["epoch"]),
                    "train_ppl": float(record["train_ppl"]),
                    "valid_ppl": float(record["valid_ppl"]),
                }
            except (KeyError, TypeError, ValueError):
                raise ReglmError(
                    f"{path}: epoch event {len(epochs) + 1} lacks stage/epoch/train_ppl/valid_ppl; the log is "
                    "damaged, restore it from the run"
                ) from None
            epochs.append({**entry, "global_epoch": len(epochs) + 1})
    if not epochs:
        raise ReglmError(
            f"{path} holds no epoch events: the run has not finished an epoch; train (or resume) it for at least "
            "one epoch"
        )
    return {"epochs": epochs, "finetune_start_epoch": finetune_start}


def output_embedding(run_dir: Path | str, checkpoint: str = "best") -> Tensor:
    """``model.output.weight: (V, E)`` of ``RUN/<checkpoint>/``, detached, on the CPU."""
    run_dir = Path(run_dir)
    if checkpoint not in ("best", "last"):
        raise ReglmError(f"checkpoint {checkpoint!r} is unknown; choose best or last")
    directory = run_dir / checkpoint
    if not (directory / MODEL_FILE).is_file():
        raise ReglmError(
            f"{directory / MODEL_FILE} is missing: {run_dir} has no {checkpoint}/ model; train the run for at "
            "least one epoch or choose the other --checkpoint"
        )
    model, _, _ = load_model_dir(directory)
    weight = getattr(model.output, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ReglmError(
            f"{directory}: the output layer ({type(model.output).__name__}) has no (V, E) weight matrix, so the "
            "run has no output embedding to analyze"
        )
    if weight.size(0) < 2:
        raise ReglmError(
            f"{directory}: the vocabulary has {weight.size(0)} word(s); nearest neighbours need at least 2"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ReglmError(f"{directory}: the output embedding holds NaN or infinite values; analyze another checkpoint")
    return weight.detach()


def analyze_run(
    run_dir: Path | str, label: str, checkpoint: str = "best", progress: bool = False, top: int | None = None
) -> dict[str, Any]:
    """Every measure of one run, as the JSON-ready record ``reglm analyze`` writes.

    ``top``: analyze only the rows of the ``top`` most frequent training words (the vocabulary
    is ordered by training frequency), the rows a short run actually moves away from their
    initialization; None: every word, as the paper's Figure 1.

    Keys: ``label``, ``path``, ``checkpoint``, ``vocab_size``, ``embedding_dim``, ``analyzed_words``, ``summary``
    (:func:`~reglm.analysis.embeddings.summary` plus ``best_valid_ppl``), ``kde`` (``bandwidth``,
    ``grid``, ``density``: the nearest-neighbour distance density on ``KDE_POINTS`` points),
    ``singular_values`` (normalized, descending) and the curve of :func:`read_curve`
    (``epochs``, ``finetune_start_epoch``).
    """
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise ReglmError(f"{run_dir} does not exist; give a run directory written by `reglm train`")
    if not run_dir.is_dir():
        raise ReglmError(f"{run_dir} is not a directory; give a run directory written by `reglm train`")
    curve = read_curve(run_dir)
    weight = output_embedding(run_dir, checkpoint)
    vocab_size = int(weight.size(0))
    if top is not None:
        weight = weight[:top]
    distances = nearest_neighbor_distances(weight, progress=progress)
    try:
        singular = normalized_singular_values(weight)
        bandwidth = scott_bandwidth(distances)
    except ValueError as exc:
        raise ReglmError(
            f"{run_dir / checkpoint}: the output embedding cannot be analyzed ({exc}); is the checkpoint trained?"
        ) from None
    d = distances.numpy()
    grid = np.linspace(max(0.0, d.min() - KDE_MARGIN * bandwidth), d.max() + KDE_MARGIN * bandwidth, KDE_POINTS)
    density = gaussian_kde(d, grid, bandwidth)
    stats = summary(distances, singular)
    stats["best_valid_ppl"] = min(e["valid_ppl"] for e in curve["epochs"])
    return {
        "label": label,
        "path": str(run_dir),
        "checkpoint": checkpoint,
        "vocab_size": vocab_size,
        "embedding_dim": int(weight.size(1)),
        "analyzed_words": int(weight.size(0)),
        "summary": stats,
        "kde": {"bandwidth": bandwidth, "grid": grid.tolist(), "density": density.tolist()},
        "singular_values": singular.tolist(),
        **curve,
    }
