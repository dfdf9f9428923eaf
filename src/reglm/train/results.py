"""The end of a run: ``best/`` scored on validation and test, ``results.json``.

For the language-model objective the scores are :func:`~reglm.evaluate.perplexity.evaluate`'s
(loss, perplexity, tokens); on the synthetic corpus, whose true probabilities are known, the
test words are also scored under the true distribution (:func:`~reglm.evaluate.perplexity.truth_comparison`). Other
objectives report their own split scores (:meth:`~reglm.objectives.objective.LMObjective.score`).

A run with a fine-tuning stage also scores the best model of its main stage when that stage
ends (:func:`record_main_stage`, the ``main_best`` event of ``metrics.jsonl``), and
``results.json`` carries those scores as ``main``: the AWD-LSTM ablations and the adversarial
softmax paper report both stages of one run.

A stop requested during these final scores (SIGINT/SIGTERM on the command line) ends them at once:
the run is complete (``best/``, ``last/`` and its last checkpoint are saved), ``results.json`` holds
the scores done so far and, under ``missing``, the splits not scored and the command that scores
them, and :class:`~reglm.errors.TrainingInterrupted` says the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from reglm.data import Corpus, Vocab
from reglm.errors import TrainingInterrupted
from reglm.evaluate.perplexity import EvalResult, Reading, evaluate, truth_comparison
from reglm.io import write_json
from reglm.modeldir import load_model_dir, read_model_meta
from reglm.objectives.objective import ObjectiveEval
from reglm.rundir import METRICS_FILE, RESULTS_FILE
from reglm.train.distributed import SingleProcess


class Trainer(Protocol):
    """What the final scores read of a run: :class:`reglm.train.trainer.Trainer` is one (this
    module does not import it: the trainer calls :func:`finish` and :func:`record_main_stage`)."""

    run_dir: Path
    device: torch.device
    corpus: Corpus
    vocab: Vocab
    objective: Any
    """the run's objective (:mod:`reglm.objectives.objective`): its ``kind`` and ``reports_perplexity``"""
    metrics: Any
    """``metrics.jsonl`` (:class:`~reglm.metrics.MetricsLog`): its ``log``"""
    dist: SingleProcess
    stop: Any
    """the :class:`~reglm.train.trainer.StopRequest` the run honours, or None"""
    step: int

    def reading(self, split: str) -> Reading:
        """How ``split`` is read (as validation reads it during the run)."""
        ...

    def score(self, model: torch.nn.Module, split: str) -> ObjectiveEval:
        """``model`` on ``split`` under the run's objective."""
        ...

    def say(self, text: str) -> None:
        """Print ``text`` (on the main process only)."""
        ...


def finish(trainer: Trainer) -> dict[str, Any]:
    """Score ``best/`` of ``trainer``'s run on validation and test and write ``results.json``."""
    model, _, _ = load_model_dir(trainer.run_dir / "best", trainer.device)
    corpus = trainer.corpus
    results: dict[str, Any] = {"best": str(trainer.run_dir / "best"), "objective": trainer.objective.kind}
    if not trainer.objective.reports_perplexity:
        with _stops_scoring(trainer, results):
            for split in ("valid", "test"):
                results[split] = trainer.score(model, split).metrics
        _record(trainer, results)
        trainer.say(
            "best model: "
            + ", ".join(
                f"{split} {name} {value:.4g}"
                for split in ("valid", "test")
                for name, value in results[split].items()
                if name != "tokens"
            )
        )
        return results
    with _stops_scoring(trainer, results):
        valid = _lm_score(trainer, model, "valid")
        results["valid"] = valid.as_dict()
        test = _lm_score(trainer, model, "test")
        results["test"] = test.as_dict()
    main = main_stage_record(trainer.run_dir)
    if main is not None:
        results["main"] = main
    if corpus.truth is not None:
        results["synthetic"] = truth_comparison(test, corpus.test, corpus.truth["test"], trainer.vocab.eos_id)
    _record(trainer, results)
    trainer.say(f"best model: valid ppl {valid.ppl:.2f}, test ppl {test.ppl:.2f} ({test.tokens} tokens)")
    if "synthetic" in results:
        s = results["synthetic"]
        trainer.say(
            f"synthetic test, words only: model ppl {s['model_word_ppl']:.2f} vs true ppl {s['true_word_ppl']:.2f}"
        )
    return results


@contextmanager
def _stops_scoring(trainer: Trainer, results: dict[str, Any]) -> Iterator[None]:
    """Around the final scores: a requested stop (the command line's signal handler raises
    ``KeyboardInterrupt`` then) writes ``results.json`` with the splits not scored under ``missing``
    and raises :class:`TrainingInterrupted`."""
    try:
        yield
    except KeyboardInterrupt:
        if trainer.stop is None or not trainer.stop.requested:
            raise
        missing = [split for split in ("valid", "test") if split not in results]
        how = f"reglm train --resume {trainer.run_dir}"
        if missing == ["test"]:
            how += f" (or reglm eval {trainer.run_dir} --split test to print it)"
        results["missing"] = {"splits": missing, "why": "the final evaluation was interrupted", "how": how}
        write_json(trainer.run_dir / RESULTS_FILE, results)
        assert trainer.stop.signum is not None
        raise TrainingInterrupted(
            trainer.stop.signum,
            trainer.run_dir,
            trainer.step,
            f"interrupted during the final evaluation; the run is complete (best/, last/ saved) but {RESULTS_FILE} "
            f"lacks the {' and '.join(missing)} score{'s' if len(missing) > 1 else ''}; "
            f"get {'it' if len(missing) == 1 else 'them'} with: {how}",
        ) from None


def _lm_score(trainer: Trainer, model: torch.nn.Module, split: str) -> EvalResult:
    """``model`` on ``split``, read as the run reads it."""
    corpus = trainer.corpus
    keep = split == "test" and corpus.truth is not None
    return evaluate(
        model,
        getattr(corpus, split),
        device=trainer.device,
        keep_token_nll=keep,
        progress=trainer.dist.is_main,
        desc=split,
        word_ends=corpus.split_word_ends(split),
        reading=trainer.reading(split),
    )


def _lm_scores(trainer: Trainer, model: torch.nn.Module) -> tuple[EvalResult, EvalResult]:
    """``model`` on the validation and test splits, read as the run reads them."""
    return _lm_score(trainer, model, "valid"), _lm_score(trainer, model, "test")


MAIN_EVENT = "main_best"
SPLIT_KEYS = ("loss", "ppl", "tokens", "words")


def record_main_stage(trainer: Trainer) -> None:
    """At the end of the main stage of a language-model run: score ``best/`` on validation and
    test and log it as the ``main_best`` event (``valid_ppl``, ``test_ppl``...)."""
    if not trainer.objective.reports_perplexity:
        return
    best = trainer.run_dir / "best"
    model, _, _ = load_model_dir(best, trainer.device)
    epoch = read_model_meta(best)["info"].get("epoch")
    valid, test = _lm_scores(trainer, model)
    scores = {
        f"{split}_{key}": value
        for split, result in (("valid", valid), ("test", test))
        for key, value in result.as_dict().items()
        if key in SPLIT_KEYS
    }
    trainer.metrics.log(event=MAIN_EVENT, step=trainer.step, best_epoch=epoch, **scores)
    trainer.say(f"main stage: best model (epoch {epoch}) valid ppl {valid.ppl:.2f}, test ppl {test.ppl:.2f}")


def main_stage_record(run_dir: Path) -> dict[str, Any] | None:
    """The main stage's scores of ``run_dir`` (its last ``main_best`` event) as ``{"valid": {...},
    "test": {...}, "best_epoch": e}``; None when the run logged none (no fine-tuning stage)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    record = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if f'"{MAIN_EVENT}"' in line:
            record = json.loads(line)
    if record is None:
        return None
    out: dict[str, Any] = {
        split: {key: record[f"{split}_{key}"] for key in SPLIT_KEYS if f"{split}_{key}" in record}
        for split in ("valid", "test")
    }
    out["best_epoch"] = record.get("best_epoch")
    return out


def _record(trainer: Trainer, results: dict[str, Any]) -> None:
    trainer.metrics.log(
        event="final", step=trainer.step, **{f"{k}_{m}": v for k in ("valid", "test") for m, v in results[k].items()}
    )
    write_json(trainer.run_dir / RESULTS_FILE, results)
