"""Popov & Kudinov's Figure 2 in `reglm study trigram`: the tracked words' probabilities are
logged at every fine-tuning step, read back per rank and drawn; bad ranks are refused."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reglm.analysis.plots import plot_trigram_figure2
from reglm.cli import main
from reglm.config import ModelConfig
from reglm.errors import ReglmError
from reglm.metrics import MetricsLog
from reglm.models import LanguageModel
from reglm.studies.trigram import TrigramStudySpec
from reglm.studies.trigram_measures import ChosenWordTracker, chosen_word_prob, read_curve


def test_tracked_words_are_logged_every_step_and_read_back_by_rank(tmp_path: Path) -> None:
    model = LanguageModel(ModelConfig.build(emb_size=4, hidden_size=4, num_layers=1, tie_weights=False), 12)
    contexts = {75: torch.tensor([0, 3, 4]), 10: torch.tensor([0, 7])}
    tracker = ChosenWordTracker(
        torch.tensor([0, 1]), 2, tuple((rank, ctx, rank % 12) for rank, ctx in contexts.items())
    )
    trainer = SimpleNamespace(model=model, metrics=MetricsLog(tmp_path / "metrics.jsonl"), step=0)
    for step in range(3):
        trainer.step = step
        tracker(trainer)
    curve = read_curve(tmp_path)
    assert curve["step"] == [0, 1, 2] and set(curve["tracked"]) == {"75", "10"}
    for rank, ctx in contexts.items():
        assert curve["tracked"][str(rank)]["step"] == [0, 1, 2]
        assert curve["tracked"][str(rank)]["prob"][0] == pytest.approx(chosen_word_prob(model, ctx, rank % 12))

    stages = {
        "ftd-perturbed": {"base": "perturbed", "lr": 1.0, "objective": "reverse-kl"},
        "ce-0.1-initial": {"base": "initial", "lr": 0.1, "objective": "lm"},
    }
    result = {
        "tracked": {"75": {"word": "w75", "true_prob": 0.01}, "10": {"word": "w10", "true_prob": 0.2}},
        "stages": stages,
        "curves": {stage: curve for stage in stages},
    }
    plot_trigram_figure2(result, tmp_path / "figure2.png")
    assert (tmp_path / "figure2.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_ranks_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ReglmError, match="frequency ranks >= 1"):
        TrigramStudySpec(tracked_ranks=(0, 10))
    assert main(["study", "trigram", "--out", str(tmp_path / "s"), "--track-ranks", "75,ten"]) == 2
    assert "--track-ranks '75,ten' must be comma-separated ranks" in capsys.readouterr().err
