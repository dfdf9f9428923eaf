"""The window planner's plan of single sentences.

SentencePlan -- single sentences (section 4.3: "for billion word we batch individual sentences"),
    each read from scratch: a sentence's inputs start at the ``<eos>`` that ends the one before and
    its targets run to its own ``<eos>`` (the first sentence's first word is the split's one
    unscored token, as in every plan). A sentence longer than ``max_tokens`` is cut into pieces of
    ``max_tokens`` targets, each read from scratch after the token before it (a window of the
    budget: attention and memory stay bounded whatever a line holds). Sentences of similar length
    are grouped ("we add examples of similar length until we reach this threshold") into batches
    of at most ``max_tokens`` tokens, padding included; in training the batches' order is shuffled
    per epoch, from the seed and the epoch alone. Scoring (``reglm score``, the API) gives its
    sentences one by one (:meth:`SentencePlan.of_sentences`): each read after a context token,
    grouped longest first, never cut (scoring reads a line longer than its window in windows).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from reglm.data.windows import Window, gather_window
from reglm.errors import ReglmError


class SentencePlan:
    """Single sentences, each read from scratch, grouped by length into batches of at most
    ``max_tokens`` tokens (padding included); see the module docstring.

    Held as tensors, never as Python objects per sentence (the billion-word corpus has 30M):
    ``first`` / ``last: (S,)`` each sentence's first and last target (its inputs start at
    ``first - 1``), ``by_length: (S,)`` the sentences by ascending length (ties by a seeded draw),
    and ``bounds: (G + 1,)`` where each batch starts in ``by_length``: batch ``k`` is the sentences
    ``by_length[bounds[k] : bounds[k + 1]]`` (:meth:`group`)."""

    carries_state = False

    def __init__(
        self,
        ids: Tensor,
        sentence_end: int,
        max_tokens: int,
        word_ends: Tensor | None = None,
        pad_id: int = 0,
        seed: int = 0,
    ) -> None:
        if ids.dim() != 1 or ids.numel() < 2:
            raise ValueError("expected a 1-D id stream of at least 2 tokens")
        if max_tokens < 1:
            raise ReglmError(f"the token budget {max_tokens} must be >= 1")
        self.ids, self.pad_id, self.seed = ids, pad_id, seed
        self.word_ends = None if word_ends is None else word_ends.to(torch.bool).cpu()
        last = self._sentence_ends(sentence_end)
        first = torch.cat([torch.ones(1, dtype=torch.long), last[:-1] + 1])
        keep = last >= first
        self.first, self.last = _cut(first[keep], last[keep], max_tokens)
        lengths = (self.last - self.first + 1).to(torch.float64)
        tiebreak = torch.rand(lengths.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.by_length = torch.argsort(lengths + tiebreak)
        self.bounds = _greedy_groups(lengths.long()[self.by_length], max_tokens)
        self._order: tuple[int, Tensor] | None = None

    @classmethod
    def of_sentences(cls, sentences: Sequence[Sequence[int]], context: int, max_tokens: int) -> SentencePlan:
        """Given sentences (non-empty lists of ids), each read from scratch after ``context``: how
        scoring reads them (:func:`reglm.evaluate.sentences.sentence_log_probs`). The stream is
        ``context, s_1, context, s_2, ...`` (a sentence may hold any id, ``<eos>`` included), so
        its targets in stream order are the sentences' ids in the order given. Grouped longest
        first: a batch takes the longest sentence left and the next ones while they fit
        ``max_tokens`` positions at its width (a longer sentence is a batch alone; nothing is
        cut, scoring reads a sentence longer than its window itself); padded with ``context``."""
        if not sentences or max_tokens < 1 or not all(sentences):
            raise ValueError("expected non-empty sentences and a token budget >= 1")
        lengths = torch.tensor([len(s) for s in sentences], dtype=torch.long)
        plan = cls.__new__(cls)
        plan.ids = torch.tensor([i for s in sentences for i in (context, *s)], dtype=torch.long)
        plan.pad_id, plan.seed, plan.word_ends, plan._order = context, 0, None, None
        plan.first = torch.cumsum(lengths + 1, 0) - lengths
        plan.last = plan.first + lengths - 1
        plan.by_length = torch.argsort(-lengths, stable=True)
        plan.bounds = _longest_first_groups(lengths[plan.by_length].tolist(), max_tokens)
        return plan

    def _sentence_ends(self, sentence_end: int, step: int = 1 << 24) -> Tensor:
        """Every sentence's last target: each ``sentence_end`` after the first token and the last
        token (a split need not end with one); found piece by piece, no (N,) mask at once."""
        ids, n = self.ids, self.ids.numel()
        ends = [torch.nonzero(ids[lo : lo + step] == sentence_end).flatten() + lo for lo in range(0, n, step)]
        last = torch.cat(ends)
        if not last.numel() or int(last[-1]) < n - 1:
            last = torch.cat([last, torch.tensor([n - 1])])
        return last

    @property
    def tokens(self) -> int:
        return self.ids.numel() - 1

    @property
    def batches(self) -> int:
        return self.bounds.numel() - 1

    def group(self, k: int) -> Tensor:
        """The sentences (indices into ``first`` / ``last``) of batch ``k``, in the plan's order
        (shortest first; longest first for :meth:`of_sentences`)."""
        return self.by_length[int(self.bounds[k]) : int(self.bounds[k + 1])]

    def to(self, device: torch.device | str) -> SentencePlan:
        self.ids = self.ids.to(device)
        return self

    def count(self, length: int | None = None) -> int:
        """How many batches :meth:`windows` yields (``length`` is the stream plans'; unused)."""
        return self.batches

    def _batch(self, k: int) -> Window:
        rows = self.group(k)
        first, last = self.first[rows], self.last[rows]
        return gather_window(self.ids, first, first, last, self.pad_id, self.word_ends)

    def windows(self, length: int | None = None) -> Iterator[Window]:
        """Every batch, shortest sentences first (``length`` is the stream plans'; unused)."""
        for k in range(self.batches):
            yield self._batch(k)

    def order(self, epoch: int) -> Tensor:
        """The batch order of (0-based) ``epoch`` (a function of the seed and the epoch alone)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                torch.randperm(self.batches, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)),
            )
        return self._order[1]

    def batch(self, epoch: int, index: int) -> Window:
        """Batch ``index`` of ``epoch`` in its shuffled order."""
        return self._batch(int(self.order(epoch)[index]))


def _cut(first: Tensor, last: Tensor, room: int) -> tuple[Tensor, Tensor]:
    """Sentences ``first .. last`` (first and last targets, ``(S,)``) with every sentence longer
    than ``room`` tokens cut into consecutive pieces of ``room`` (the last one shorter), each a
    sentence of its own read from scratch: no batch ever exceeds the token budget."""
    pieces = (last - first) // room + 1
    if not pieces.numel() or int(pieces.max()) <= 1:
        return first, last
    owner = torch.repeat_interleave(torch.arange(first.numel()), pieces)
    start = torch.cumsum(pieces, 0) - pieces
    k = torch.arange(owner.numel()) - start[owner]
    begin = first[owner] + k * room
    return begin, torch.minimum(begin + room - 1, last[owner])


def _longest_first_groups(widths: list[int], max_tokens: int) -> Tensor:
    """Group boundaries of descending ``widths``: each group is its first (widest) sentence and
    the next ones up to ``max_tokens // width`` in all (at least one)."""
    bounds = [0]
    while bounds[-1] < len(widths):
        bounds.append(min(len(widths), bounds[-1] + max(1, max_tokens // widths[bounds[-1]])))
    return torch.tensor(bounds)


def _greedy_groups(widths: Tensor, max_tokens: int) -> Tensor:
    """Group boundaries of ascending ``widths: (S,)``: each group takes the next sentence while
    ``width * (size + 1) <= max_tokens`` (its first one always), the grouping of a loop over the
    sentences, computed per run of equal widths (a few hundred runs, not 30M sentences)."""
    values, counts = torch.unique_consecutive(widths, return_counts=True)
    sizes: list[Tensor] = []
    open_size = 0
    for width, count in zip(values.tolist(), counts.tolist()):
        fit = max_tokens // width
        if open_size:
            take = min(count, max(fit - open_size, 0))
            open_size, count = open_size + take, count - take
            if count:
                sizes.append(torch.tensor([open_size]))
                open_size = 0
        if count:
            size = max(fit, 1)
            full, open_size = divmod(count, size)
            sizes.append(torch.full((full,), size))
    if open_size:
        sizes.append(torch.tensor([open_size]))
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(sizes).cumsum(0)])
