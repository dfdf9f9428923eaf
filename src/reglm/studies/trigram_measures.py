"""What the trigram study (:mod:`reglm.studies.trigram`) measures: Table 1's row of a model and
of the true distribution, the fixed contexts of the chosen and tracked words, and the step hook
that logs their probabilities (and the validation perplexity) during a fine-tuning, read back
from ``metrics.jsonl`` as Figure 1's and Figure 2's curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from reglm.data import Corpus
from reglm.data.vocab import EOS
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import evaluate, perplexity
from reglm.models import LanguageModel
from reglm.train.run import Trainer


class ChosenWordTracker:
    """A step hook: the model's probability of the chosen word after the fixed context, logged
    to the run's ``metrics.jsonl`` as ``{"event": "chosen_word", "step", "prob"}``, and of each
    ``tracked`` word ``(rank, context, word)`` after its own context, as ``{"event":
    "tracked_word", "step", "rank", "prob"}`` (Figure 2); with ``valid`` (ids of whole validation
    sentences), the perplexity over its words as ``{"event": "valid_step", "step", "ppl"}``
    (Figure 1, left)."""

    def __init__(
        self,
        context: torch.Tensor,
        word: int,
        tracked: tuple[tuple[int, torch.Tensor, int], ...] = (),
        valid: torch.Tensor | None = None,
    ) -> None:
        self.context = context
        self.word = word
        self.tracked = tracked
        self.valid = valid

    def __call__(self, trainer: Trainer) -> None:
        trainer.metrics.log(
            event="chosen_word", step=trainer.step, prob=chosen_word_prob(trainer.model, self.context, self.word)
        )
        for rank, context, word in self.tracked:
            trainer.metrics.log(
                event="tracked_word", step=trainer.step, rank=rank, prob=chosen_word_prob(trainer.model, context, word)
            )
        if self.valid is not None:
            ppl = word_perplexity(trainer.model, self.valid, trainer.vocab.eos_id)
            trainer.metrics.log(event="valid_step", step=trainer.step, ppl=ppl)


def word_perplexity(model: LanguageModel, ids: torch.Tensor, eos_id: int) -> float:
    """Perplexity of ``model`` over the word targets of ``ids`` (``<eos>`` excluded), read as 64
    streams in eval mode; the model is put back in its mode."""
    was_training = model.training
    result = evaluate(model, ids, 64, 35, next(model.parameters()).device, keep_token_nll=True)
    model.train(was_training)
    assert result.token_nll is not None and result.positions is not None
    words = ids[result.positions] != eos_id
    return perplexity(float(result.token_nll.double()[words].mean()))


@torch.no_grad()
def chosen_word_prob(model: LanguageModel, context: torch.Tensor, word: int) -> float:
    """``p(word | context)`` under ``model`` in eval mode, ``context: (T,)`` read from a zero state."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    log_probs, _ = model.log_probs(context.to(device).unsqueeze(0))
    model.train(was_training)
    return float(log_probs[0, -1, word].exp())


def fixed_context(corpus: Corpus, word: int) -> tuple[torch.Tensor, float]:
    """The test-set prefix after which ``word`` has its highest true probability, among the
    positions where it occurs: ``(context ids, true probability)``, the context running from the
    ``<eos>`` before the previous sentence (so it holds the two words the true probability depends
    on, also for a sentence's first words, which continue the sentence before), or from the split's
    start. (Also the context of every tracked word of Figure 2.)"""
    assert corpus.truth is not None
    test, logp = corpus.test, corpus.truth["test"]
    hits = (test == word).nonzero().flatten()
    hits = hits[hits > 0]
    if hits.numel() == 0:
        raise ReglmError(
            f"the chosen word {corpus.vocab.itos[word]!r} never occurs in the test split; choose another "
            "--chosen-rank or more --sentences"
        )
    best = int(hits[logp[hits].argmax()])
    eos = (test[:best] == corpus.vocab.eos_id).nonzero().flatten()
    start = int(eos[-2]) if eos.numel() > 1 else 0
    return test[start:best].clone(), float(logp[best].exp())


def frequency_ranking(corpus: Corpus) -> list[int]:
    """Word ids (``<eos>`` excluded) from the most to the least frequent in training."""
    vocab = corpus.vocab
    return sorted(
        (i for i in range(len(vocab)) if vocab.itos[i] != EOS), key=lambda i: (-vocab.counts[i], vocab.itos[i])
    )


def table_row(
    model: LanguageModel, corpus: Corpus, frequent: torch.Tensor, batch_size: int, device: torch.device, chosen: int
) -> dict[str, float]:
    """Table 1's columns for ``model`` over the test words (``<eos>`` targets excluded), and
    ``ppl_except_chosen``, the perplexity over the words other than ``chosen`` (section 3: 84.56 for
    the perturbed model fine-tuned with the discriminator)."""
    assert corpus.truth is not None
    result = evaluate(model, corpus.test, batch_size, 35, device, keep_token_nll=True)
    assert result.token_nll is not None and result.positions is not None
    targets = corpus.test[result.positions]
    words = targets != corpus.vocab.eos_id
    nll = result.token_nll.double()
    diff = corpus.truth["test"][result.positions].double() + nll  # log p - log q
    freq = words & frequent[targets]
    rare = words & ~frequent[targets]
    row = {
        "test_ppl": perplexity(float(nll[words].mean())),
        "frequent_ppl": perplexity(float(nll[freq].mean())),
        "rare_ppl": perplexity(float(nll[rare].mean())),
        "logq_minus_logp_mean": float(-diff[words].mean()),
        "logq_minus_logp_std": float(diff[words].std()),
        "ppl_except_chosen": perplexity(float(nll[words & (targets != chosen)].mean())),
    }
    row["ratio"] = row["rare_ppl"] / row["frequent_ppl"]
    return row


def true_row(corpus: Corpus, frequent: torch.Tensor) -> dict[str, float]:
    """Table 1's row of the true distribution over the test positions the models are scored on
    (every token but the first)."""
    assert corpus.truth is not None
    positions = torch.arange(1, corpus.test.numel())
    targets = corpus.test[positions]
    words = targets != corpus.vocab.eos_id
    logp = corpus.truth["test"][positions].double()
    freq, rare = words & frequent[targets], words & ~frequent[targets]
    row = {
        name: perplexity(-float(logp[mask].mean()))
        for name, mask in (("test_ppl", words), ("frequent_ppl", freq), ("rare_ppl", rare))
    }
    row["ratio"] = row["rare_ppl"] / row["frequent_ppl"]
    return row


def read_curve(run_dir: Path) -> dict[str, Any]:
    """The chosen word's curve (``step``, ``prob``), each tracked word's (``tracked``: rank -> ``step``,
    ``prob``) and the validation perplexity's (``valid``: ``step``, ``ppl``)."""
    steps, probs = [], []
    tracked: dict[str, dict[str, list[float]]] = {}
    valid: dict[str, list[float]] = {"step": [], "ppl": []}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "chosen_word":
            steps.append(record["step"])
            probs.append(record["prob"])
        elif record.get("event") == "tracked_word":
            curve = tracked.setdefault(str(record["rank"]), {"step": [], "prob": []})
            curve["step"].append(record["step"])
            curve["prob"].append(record["prob"])
        elif record.get("event") == "valid_step":
            valid["step"].append(record["step"])
            valid["ppl"].append(record["ppl"])
    return {"step": steps, "prob": probs, "tracked": tracked, "valid": valid}
