"""Test loss binned by word frequency (Baevski & Auli 2019, Figures 2-5).

Each scored target of a split gets the training-set count of a word: its own (Figures 2 and 4,
"loss of models when binning by word frequency") or that of the word before it (Figures 3 and 5,
"binning by the frequency of the previous word"). The counts fall into decades, as in the
paper's x axes, labelled by their upper end: ``10`` holds counts 0-9, ``100`` counts 10-99, ...,
``1M`` counts 100K-999,999 and ``1M+`` a million and more; words never seen in training
(``<unk>``'s own count aside) fall into the first bin. A bin's value is the mean NLL (nats) of
the targets in it, so the bins are not cumulative.

For a sub-word model the unit of both the loss and the frequency is the word: a word's loss is
the sum of its units' NLLs and its count that of the word in the training text, so the bins of
a BPE model line up with those of a word model of the same corpus (the paper's Figure 2 does
this). The first word of the split has no scored loss (no token precedes it) and is left out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

BIN_LABELS = ("10", "100", "1K", "10K", "100K", "1M", "1M+")
"""Upper ends of the decades of training counts (the paper's x-axis labels)."""


def frequency_bin(counts: Tensor) -> Tensor:
    """The decade of every training count: ``0`` for counts below 10, ``1`` for 10-99, ...,
    ``6`` for a million and more."""
    counts = counts.to(torch.float64).clamp_min(1)
    return torch.floor(torch.log10(counts)).clamp(0, len(BIN_LABELS) - 1).long()


def binned_loss(nll: Tensor, counts: Tensor) -> dict[str, list[Any]]:
    """Mean of ``nll: (M,)`` over the targets of each decade of ``counts: (M,)``; ``None`` for an
    empty bin. Returns ``{"bins", "mean_loss", "targets"}`` in bin order."""
    bins = frequency_bin(counts)
    sums = torch.zeros(len(BIN_LABELS), dtype=torch.float64).index_add_(0, bins, nll.to(torch.float64))
    sizes = torch.bincount(bins, minlength=len(BIN_LABELS))
    means = [float(s / n) if n > 0 else None for s, n in zip(sums, sizes)]
    return {"bins": list(BIN_LABELS), "mean_loss": means, "targets": sizes.tolist()}


def word_level(token_nll: Tensor, positions: Tensor, word_ends: Tensor | None, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per word of a stream of ``n`` tokens whose units are all scored: the summed NLL of its
    units and its first and last unit's stream index. ``token_nll, positions: (M,)`` are the
    scored targets' NLLs and stream indices; without ``word_ends: (n,)`` every token is a word.
    Returns ``(loss, first, last)``, each ``(W,)``."""
    scored = torch.full((n,), float("nan"), dtype=torch.float64)
    scored[positions] = token_nll.to(torch.float64)
    last = torch.arange(n) if word_ends is None else torch.nonzero(word_ends.cpu()).flatten()
    first = torch.cat([torch.zeros(1, dtype=torch.long), last[:-1] + 1])
    total = torch.cat([torch.zeros(1, dtype=torch.float64), torch.nan_to_num(scored, nan=0.0).cumsum(0)])
    missing = torch.cat([torch.zeros(1, dtype=torch.long), torch.isnan(scored).long().cumsum(0)])
    complete = missing[last + 1] == missing[first]
    return (total[last + 1] - total[first])[complete], first[complete], last[complete]


def loss_by_frequency(
    token_nll: Tensor, positions: Tensor, word_keys: Tensor, key_counts: Tensor, word_ends: Tensor | None = None
) -> dict[str, Any]:
    """Figures 2 and 3 for one model on one split.

    ``token_nll, positions: (M,)`` every scored target's NLL and stream index; ``word_keys: (N,)``
    for every token of the split the key of the word it belongs to (a word model: its id; a
    sub-word model: the word's index in a table of words, the same for all its units);
    ``key_counts: (K,)`` the training count of every key; ``word_ends: (N,)`` the sub-word
    models' word ends. Returns ``{"by_frequency", "by_previous_frequency"}`` (:func:`binned_loss`,
    the previous word's count for the second; the split's first word has none and is left out)
    and ``words`` (how many words were binned)."""
    losses, first, last = word_level(token_nll, positions, word_ends, word_keys.numel())
    keys = word_keys.cpu()
    own = key_counts[keys[last]]
    has_previous = first > 0
    previous = key_counts[keys[(first - 1).clamp_min(0)]]
    return {
        "by_frequency": binned_loss(losses, own),
        "by_previous_frequency": binned_loss(losses[has_previous], previous[has_previous]),
        "words": int(losses.numel()),
    }


def word_keys(
    ids: Tensor, word_ends: Tensor | None, train_ids: Tensor, train_word_ends: Tensor | None, vocab: Any
) -> tuple[Tensor, Tensor]:
    """``(keys, counts)`` for :func:`loss_by_frequency`: a word model's keys are its ids and the
    counts those of the training split; a sub-word model's words are re-joined from their units
    (``vocab.join``) on both splits and numbered, a split's word unseen in training counting 0."""
    if word_ends is None:
        return ids.cpu(), torch.bincount(train_ids.cpu(), minlength=len(vocab))
    table: dict[str, int] = {}
    counts: list[int] = []
    for word in vocab.join(train_ids.tolist(), train_word_ends.tolist()):
        key = table.setdefault(word, len(table))
        if key == len(counts):
            counts.append(0)
        counts[key] += 1
    unseen = len(table)
    words = [table.get(word, unseen) for word in vocab.join(ids.tolist(), word_ends.tolist())]
    word_index = torch.cat([torch.zeros(1, dtype=torch.long), word_ends.cpu().long().cumsum(0)[:-1]])
    keys = torch.tensor(words + [unseen], dtype=torch.long)[word_index.clamp_max(len(words))]
    return keys, torch.tensor([*counts, 0], dtype=torch.long)


def frequency_analysis(
    model: torch.nn.Module, corpus: Any, split: str, reading: Any, device: torch.device | str, progress: bool = False
) -> dict[str, Any]:
    """Score ``split`` of ``corpus`` with ``model`` as ``reading`` says and bin the loss of every
    word by its and its predecessor's training frequency (:func:`loss_by_frequency`); also the
    split's perplexity (word-level)."""
    from reglm.evaluate.perplexity import evaluate

    ids, word_ends = getattr(corpus, split), corpus.split_word_ends(split)
    result = evaluate(
        model,
        ids,
        device=device,
        keep_token_nll=True,
        progress=progress,
        desc=f"{split} (by frequency)",
        word_ends=word_ends,
        reading=reading,
    )
    assert result.token_nll is not None and result.positions is not None
    keys, counts = word_keys(ids, word_ends, corpus.train, corpus.split_word_ends("train"), corpus.vocab)
    return {
        "split": split,
        "ppl": result.ppl,
        **loss_by_frequency(result.token_nll, result.positions, keys, counts, word_ends),
    }
