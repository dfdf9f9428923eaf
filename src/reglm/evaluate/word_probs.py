"""Word-level outputs of an evaluation: each token's probability, and the per-word loss change.

Both read an :class:`~reglm.evaluate.perplexity.EvalResult` that kept its per-token NLL
(``keep_token_nll=True``) -- of plain evaluation, the cache or any other evaluation mode -- and
write a UTF-8 TSV file with a header line, atomically (:mod:`reglm.io`): a crash leaves the old
file or the new one, never a partial one. An existing file is replaced.

``position`` is the index of the target in the split's token stream (its words in file order,
one ``<eos>`` per line, 0-based). Every token but the first is a target exactly once, whatever
the number of streams, so the file holds ``N - 1`` rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from reglm.data.vocab import Vocab
from reglm.evaluate.perplexity import EvalResult
from reglm.io import write_text


def _flat(result: EvalResult) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, nll)`` of every scored target, both ``(n,)``, in stream order."""
    if result.token_nll is None or result.positions is None:
        raise ValueError("the result holds no per-token NLL; evaluate with keep_token_nll=True")
    return result.positions, result.token_nll


def write_word_probs(path: Path | str, result: EvalResult, ids: torch.Tensor, vocab: Vocab) -> None:
    """Write ``position, word, prob, log_prob`` per scored target of ``ids`` (N,), in stream order.

    ``prob`` is ``exp(-nll)``, ``log_prob`` the natural log ``-nll``, each with 9 significant
    digits (a float32 NLL round-trips).
    """
    positions, nll = _flat(result)
    targets = ids[positions].tolist()
    lines = ["position\tword\tprob\tlog_prob"]
    for pos, target, logp, p in zip(positions.tolist(), targets, (-nll).tolist(), torch.exp(-nll.double()).tolist()):
        lines.append(f"{pos}\t{vocab.itos[target]}\t{p:.9g}\t{logp:.9g}")
    write_text(Path(path), "\n".join(lines) + "\n")


def loss_deltas(result: EvalResult, baseline: EvalResult, ids: torch.Tensor, vocab: Vocab) -> list[tuple[str, int, float]]:
    """Per target word type: ``(word, count, delta)``, ``delta`` = the sum over its occurrences of
    ``nll_result - nll_baseline`` (nats; negative: ``result`` predicts it better), sorted by
    ``delta`` (most helped first), ties by word. The two results must score the same targets.

    This is Table 3 of the AWD-LSTM paper (cache vs model alone), whose "Δloss" column is the
    negation (baseline minus cache).
    """
    positions, nll = _flat(result)
    base_positions, base_nll = _flat(baseline)
    if not torch.equal(positions, base_positions):
        raise ValueError("the two results score different targets")
    targets = ids[positions]
    delta = torch.zeros(len(vocab), dtype=torch.float64).index_add_(0, targets, nll.double() - base_nll.double())
    counts = torch.bincount(targets, minlength=len(vocab))
    rows = [(vocab.itos[i], int(counts[i]), float(delta[i])) for i in torch.nonzero(counts).flatten().tolist()]
    return sorted(rows, key=lambda row: (row[2], row[0]))


def write_loss_deltas(path: Path | str, result: EvalResult, baseline: EvalResult, ids: torch.Tensor, vocab: Vocab) -> None:
    """Write :func:`loss_deltas` as ``word, count, delta_loss`` rows."""
    lines = ["word\tcount\tdelta_loss"]
    lines += [f"{word}\t{count}\t{delta:.6f}" for word, count, delta in loss_deltas(result, baseline, ids, vocab)]
    write_text(Path(path), "\n".join(lines) + "\n")
