"""Word-level outputs of an evaluation: each token's probability, and the per-word loss change.

Both read an :class:`~reglm.evaluate.perplexity.EvalResult` that kept its per-token NLL
(``keep_token_nll=True``) -- of plain evaluation, the cache or any other evaluation mode -- and
write a UTF-8 TSV file with a header line, atomically (:mod:`reglm.io`): a crash leaves the old
file or the new one, never a partial one. An existing file is replaced.

The TSV is written as Python's ``csv`` module writes it (:func:`tsv`): a field holding a double
quote is quoted, its quotes doubled (the token ``"`` becomes the field ``"\"\"\""``), so that
``csv.reader(f, delimiter="\\t")`` and ``pandas.read_csv(path, sep="\\t", keep_default_na=False)``
read every row back exactly (``keep_default_na=False`` keeps words such as ``null`` or ``n/a``
from turning into NaN).

``position`` is the index of the target in the split's token stream (its words in file order,
one ``<eos>`` per line, 0-based); ``line`` (1-based) and ``index`` (0-based, the ``<eos>`` after
the line's last word) say where it stands in the split's file. The evaluation scores every token
but the first, exactly once whatever the number of streams (the papers' protocol: ``N - 1``
targets make the perplexity); given the first token's log-probability after ``<eos>`` (from the
encoder's zero state, as a sentence is scored), the file holds all ``N`` rows, the first of them
outside the reported perplexity.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from reglm.data.vocab import Vocab
from reglm.evaluate.perplexity import EvalResult
from reglm.io import write_text


def tsv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """``header`` and ``rows`` as TSV text in the ``csv`` module's dialect (tab-separated, a field
    with a quote quoted, ``\n`` line ends)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _flat(result: EvalResult) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions, nll)`` of every scored target, both ``(n,)``, in stream order."""
    if result.token_nll is None or result.positions is None:
        raise ValueError("the result holds no per-token NLL; evaluate with keep_token_nll=True")
    return result.positions, result.token_nll


def write_word_probs(
    path: Path | str, result: EvalResult, ids: torch.Tensor, vocab: Vocab, first_log_prob: float | None = None
) -> None:
    """Write ``position, line, index, word, prob, log_prob`` per scored target of ``ids`` (N,), in
    stream order, preceded by the first token's row when ``first_log_prob`` is given.

    ``prob`` is ``exp(log_prob)``, ``log_prob`` the natural log ``-nll``, each with 9 significant
    digits (a float32 NLL round-trips).
    """
    positions, nll = _flat(result)
    log_probs = (-nll).double()
    if first_log_prob is not None:
        positions = torch.cat([torch.zeros(1, dtype=positions.dtype), positions])
        log_probs = torch.cat([torch.tensor([first_log_prob], dtype=torch.float64), log_probs])
    line_of, index_of = _places(ids, vocab.eos_id)
    targets = ids[positions].tolist()
    rows = zip(
        positions.tolist(),
        line_of[positions].tolist(),
        index_of[positions].tolist(),
        targets,
        log_probs.tolist(),
        torch.exp(log_probs).tolist(),
    )
    body = (
        (pos, line, index, vocab.itos[target], f"{p:.9g}", f"{logp:.9g}") for pos, line, index, target, logp, p in rows
    )
    write_text(Path(path), tsv(["position", "line", "index", "word", "prob", "log_prob"], body))


def _places(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(line, index)`` of every token of a split, both ``(N,)``: its 1-based line in the file
    and its 0-based place in that line (``<eos>`` ends every line)."""
    eos = ids == eos_id
    line = torch.cumsum(eos, 0) - eos.long() + 1
    position = torch.arange(ids.numel())
    line_start = torch.zeros(ids.numel() + 1, dtype=torch.long)
    line_start[1:][eos] = position[eos] + 1
    starts = torch.cummax(line_start[:-1], 0).values
    return line, position - starts


def loss_deltas(
    result: EvalResult, baseline: EvalResult, ids: torch.Tensor, vocab: Vocab
) -> list[tuple[str, int, float]]:
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


def write_loss_deltas(
    path: Path | str, result: EvalResult, baseline: EvalResult, ids: torch.Tensor, vocab: Vocab
) -> None:
    """Write :func:`loss_deltas` as ``word, count, delta_loss`` rows."""
    rows = ((word, count, f"{delta:.6f}") for word, count, delta in loss_deltas(result, baseline, ids, vocab))
    write_text(Path(path), tsv(["word", "count", "delta_loss"], rows))
