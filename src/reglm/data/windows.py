"""The window planner: every pass over a token stream gets its windows from here.

A window is ``(inputs, targets, scored, positions)`` plus how many tokens it scores and how many
words those tokens close. The plans:

:class:`StreamPlan` -- stateful streams (LSTM encoders).
    The split is cut into ``B`` contiguous streams, one per batch row, read left to right in
    windows of ``bptt`` columns; the state carries from window to window. Two covers:

    * ``"all"`` (every evaluation): the ``N - 1`` targets of the split (every token but the first)
      are dealt into ``B`` streams of ``ceil`` / ``floor`` of ``(N - 1) / B`` targets; each stream's
      inputs start one token before its first target, so consecutive streams overlap by that one
      token and **every target is scored exactly once, whatever the batch size**. The shorter
      streams are padded in their last column, which is not scored. At ``B = 1`` this is the
      single stream ``inputs = ids[:-1]``, ``targets = ids[1:]``.
    * ``"trim"`` (training, the papers' batching, Zaremba et al. and AWD-LSTM): row ``b`` is
      ``ids[b L : (b + 1) L]`` with ``L = N // B``; the last ``N mod B`` tokens and the first token
      of every row are never targets. Batch-first ``(B, L)``, unlike the reference's ``(L, B)``.

:class:`ContextPlan` -- stateless blocks with context (Transformer encoders; Baevski & Auli's
    Table 5). Windows of at most ``block`` tokens; each window after the first starts ``context``
    tokens before its first scored target, which the model reads but does not score, so every
    target of the split is scored exactly once. ``context = 0`` is plain block evaluation. With
    ``sentence_ends`` (a mask of the tokens that end a sentence, ``<eos>``) the scored part of a
    window ends at a sentence end whenever one falls inside it: blocks of complete sentences
    (section 4.3: "we require blocks to contain complete sentences totaling up to 512 tokens");
    a sentence longer than the room is split.

:class:`BlockPlan` -- stateless training blocks (section 4.3: "we partition the training data
    into blocks of 512 contiguous tokens ignoring document boundaries"): the training split cut
    into blocks of ``block`` targets, shuffled per epoch (the order a function of the seed and the
    epoch, so a resumed run reads the same order), ``batch_size`` blocks per batch. The last
    ``(N - 1) mod block`` targets, and the blocks that do not fill a last batch, are not read.

SentencePlan -- single sentences (billion word), each read from scratch: in
    :mod:`reglm.data.sentence_plan`.

Word counts: with ``word_ends: (N,) bool`` (``True`` where a token closes a word; sub-word
models), a window's ``words`` counts the words its scored targets close, so that the perplexity
of a sub-word model is word-level: ``exp(summed NLL / words)``. Without it every token is a word.

Ids: a plan takes the 1-D stream in any integer dtype torch indexes with (int64 in memory, int32
memory-mapped from the encoded-corpus cache, :mod:`reglm.data.cache`) and never copies it: the
training plans hold a view (streams) or index it per batch (blocks, sentences), so a mapped
corpus stays a mapping; windows are int64. Under data parallelism the streams' plan takes
``shard=(rank, world_size)`` and holds only rows ``r B / W .. (r + 1) B / W``, one contiguous part
of the file (blocks and sentences are shared out per batch by :mod:`reglm.data.batchings`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from reglm.errors import ReglmError

COVERS = ("all", "trim")


@dataclass
class Window:
    """One batch of a pass: ``inputs, targets, positions: (B, T)`` and ``scored: (B, T)`` bool
    (``None``: every target is scored). ``positions`` is each target's index in the 1-D stream
    (``-1`` where nothing is scored); ``tokens`` and ``words`` count the scored targets and the
    words they close. ``start`` is the window's first column (stream plans)."""

    inputs: Tensor
    targets: Tensor
    scored: Tensor | None
    positions: Tensor
    tokens: int
    words: int
    start: int = 0

    def to(self, device: torch.device | str) -> Window:
        scored = None if self.scored is None else self.scored.to(device)
        return Window(
            self.inputs.to(device), self.targets.to(device), scored, self.positions, self.tokens, self.words, self.start
        )

    def scored_values(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """``(positions, values)`` of the scored targets, both 1-D, from ``values: (B, T)`` (on the CPU)."""
        mask = self.positions >= 0
        return self.positions[mask], values.detach().float().cpu()[mask]

    def masked_sum(self, values: Tensor) -> Tensor:
        """The float64 sum of ``values: (..., B, T)`` over the scored targets (leading dims kept)."""
        if self.scored is not None:
            values = values.masked_fill(~self.scored, 0)
        return values.sum(dim=(-2, -1), dtype=torch.float64)


def _word_count(word_ends: Tensor | None, positions: Tensor, scored: Tensor | None, tokens: int) -> int:
    if word_ends is None:
        return tokens
    picked = word_ends[positions.clamp_min(0)]
    if scored is not None:
        picked = picked & scored
    return int(picked.sum())


class StreamPlan:
    """``B`` contiguous streams of a 1-D id stream; see the module docstring."""

    carries_state = True
    """consecutive windows continue the same streams"""

    def __init__(
        self,
        ids: Tensor,
        batch_size: int,
        cover: str = "all",
        word_ends: Tensor | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if ids.dim() != 1:
            raise ValueError(f"expected a 1-D id stream, got shape {tuple(ids.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be >= 1")
        if cover not in COVERS:
            raise ValueError(f"cover must be one of {COVERS}, got {cover!r}")
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard {shard}: expected (rank, world_size) with 0 <= rank < world_size")
        if world > 1 and (cover != "trim" or batch_size % world):
            raise ValueError(f"shards split the training streams: cover='trim' and a batch size divisible by {world}")
        n = ids.numel()
        self.batch_size = batch_size // world
        self.cover = cover
        self.word_ends = None if word_ends is None else word_ends.to(torch.bool).cpu()
        if cover == "trim":
            length = n // batch_size
            if length < 2:
                raise ReglmError(
                    f"a stream of {n} tokens is too short for batch size {batch_size} "
                    "(each row needs at least 2 tokens); lower the batch size or use more data"
                )
            rows = slice(rank * self.batch_size, (rank + 1) * self.batch_size)
            self.data = ids[: length * batch_size].view(batch_size, length)[rows]
            self.target_pos: Tensor | None = None
            """``(B, columns)`` stream index of every target, ``-1`` for padding (cover ``all``);
            the trim cover computes a window's from ``row_start`` (B x 8 bytes per token otherwise)"""
            self.row_start = (torch.arange(batch_size) * length)[rows]
            self.valid: Tensor | None = None
        else:
            targets = n - 1
            if targets < batch_size:
                raise ReglmError(
                    f"a split of {n} tokens has {targets} targets, too few for batch size {batch_size} (one stream "
                    "each); lower the batch size"
                )
            q, r = divmod(targets, batch_size)
            lengths = torch.full((batch_size,), q, dtype=torch.long)
            lengths[:r] += 1
            first = 1 + torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
            columns = int(lengths.max())
            offsets = torch.arange(columns).unsqueeze(0)
            self.valid = offsets < lengths.unsqueeze(1)
            pos = first.unsqueeze(1) + offsets
            self.target_pos = torch.where(self.valid, pos, torch.full_like(pos, -1))
            index = torch.cat([first.unsqueeze(1) - 1, pos], dim=1).clamp_max(n - 1)
            self.data = (ids[index] if ids.device.type == "cpu" else ids[index.to(ids.device)]).long()
            if bool(self.valid.all()):
                self.valid = None

    @property
    def columns(self) -> int:
        """Targets per stream (the padded width)."""
        return self.data.size(1) - 1

    @property
    def tokens(self) -> int:
        """How many targets the plan scores in all."""
        if self.target_pos is None:
            return self.data.size(0) * self.columns
        return int((self.target_pos >= 0).sum())

    def to(self, device: torch.device | str) -> StreamPlan:
        """The plan with its id matrix on ``device`` (positions and masks stay on the CPU; on the
        CPU the matrix stays a view of the stream)."""
        self.data = self.data.to(device)
        return self

    def window(self, start: int, length: int) -> Window:
        """The window of at most ``length`` columns at column ``start``."""
        if not 0 <= start < self.columns:
            raise ValueError(f"start {start} outside [0, {self.columns})")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        s = min(length, self.columns - start)
        if self.target_pos is None:
            positions = self.row_start.unsqueeze(1) + torch.arange(start + 1, start + 1 + s)
        else:
            positions = self.target_pos[:, start : start + s]
        scored = None if self.valid is None else self.valid[:, start : start + s]
        if scored is not None and bool(scored.all()):
            scored = None
        tokens = positions.numel() if scored is None else int(scored.sum())
        scored_dev = None if scored is None else scored.to(self.data.device)
        columns = self.data[:, start : start + s + 1].long()
        return Window(
            columns[:, :-1],
            columns[:, 1:],
            scored_dev,
            positions,
            tokens,
            _word_count(self.word_ends, positions, scored, tokens),
            start,
        )

    def windows(self, length: int) -> Iterator[Window]:
        """Consecutive windows of ``length`` columns, left to right."""
        for start in range(0, self.columns, length):
            yield self.window(start, length)

    def count(self, length: int) -> int:
        """How many windows :meth:`windows` yields."""
        return -(-self.columns // length)


class ContextPlan:
    """Stateless windows of at most ``block`` tokens, each scoring the targets after its first
    ``context`` (except the first window, which scores all); ``batch_size`` windows per batch;
    with ``sentence_ends``, scored parts end at sentence ends (see the module docstring)."""

    carries_state = False
    """every window is read from scratch"""

    def __init__(
        self,
        ids: Tensor,
        block: int,
        context: int = 0,
        batch_size: int = 1,
        word_ends: Tensor | None = None,
        pad_id: int = 0,
        sentence_ends: Tensor | None = None,
    ) -> None:
        if ids.dim() != 1 or ids.numel() < 2:
            raise ValueError("expected a 1-D id stream of at least 2 tokens")
        if block < 1:
            raise ReglmError(f"the block length {block} must be >= 1")
        if not 0 <= context < block:
            raise ReglmError(f"the context ({context} tokens) must be smaller than the block ({block} tokens)")
        if batch_size < 1:
            raise ValueError(f"batch size {batch_size} must be >= 1")
        self.ids, self.block, self.context, self.batch_size, self.pad_id = ids, block, context, batch_size, pad_id
        self.word_ends = None if word_ends is None else word_ends.to(torch.bool).cpu()
        ends = None if sentence_ends is None else torch.nonzero(sentence_ends.cpu()).flatten()
        n_targets = ids.numel() - 1
        spans = []
        first = 1
        while first <= n_targets:
            ctx = min(context, first - 1) if spans else 0
            last = min(n_targets, first - ctx + block - 1)
            if ends is not None and last < n_targets:
                inside = ends[(ends >= first) & (ends <= last)]
                if inside.numel():
                    last = int(inside[-1])
            spans.append((first - ctx, first, last))
            first = last + 1
        self.spans = spans
        """``(input start, first scored target, last target)`` of every window, in stream order."""

    @property
    def tokens(self) -> int:
        return self.ids.numel() - 1

    def to(self, device: torch.device | str) -> ContextPlan:
        self.ids = self.ids.to(device)
        return self

    def count(self, length: int | None = None) -> int:
        """How many batches :meth:`windows` yields (``length`` is the stream plans'; unused)."""
        return -(-len(self.spans) // self.batch_size)

    def windows(self, length: int | None = None) -> Iterator[Window]:
        """The batches of windows, in stream order (``length`` is the stream plans'; unused)."""
        for i in range(0, len(self.spans), self.batch_size):
            begin, first, last = torch.tensor(self.spans[i : i + self.batch_size], dtype=torch.long).unbind(1)
            yield gather_window(self.ids, begin, first, last, self.pad_id, self.word_ends)


def gather_window(
    ids: Tensor, begin: Tensor, first: Tensor, last: Tensor, pad_id: int, word_ends: Tensor | None
) -> Window:
    """One batch of stateless windows, a row per ``(input start, first scored target, last target)``
    (``begin, first, last: (R,)``, indices into ``ids``), padded on the right to the longest: one
    indexing of ``ids`` on its device."""
    width = int((last - begin).max()) + 1
    cols = torch.arange(width)
    target_pos = begin.unsqueeze(1) + cols  # (R, W): the stream index each column predicts
    inside = target_pos <= last.unsqueeze(1)
    index = torch.where(inside, target_pos, begin.unsqueeze(1)).to(ids.device)
    pad = (~inside).to(ids.device)
    inputs = ids[index - 1].long().masked_fill(pad, pad_id)
    targets = ids[index].long().masked_fill(pad, pad_id)
    scored = inside & (target_pos >= first.unsqueeze(1))
    positions = torch.where(scored, target_pos, -1)
    tokens = int(scored.sum())
    return Window(
        inputs, targets, scored.to(ids.device), positions, tokens, _word_count(word_ends, positions, scored, tokens)
    )


class BlockPlan:
    """Shuffled training blocks of ``block`` targets, ``batch_size`` per batch (see the module docstring)."""

    carries_state = False

    def __init__(self, ids: Tensor, block: int, batch_size: int, seed: int) -> None:
        if block < 1 or batch_size < 1:
            raise ValueError("block and batch size must be >= 1")
        n_blocks = (ids.numel() - 1) // block
        if n_blocks < batch_size:
            raise ReglmError(
                f"the training split ({ids.numel()} tokens) holds {n_blocks} blocks of {block} tokens, fewer than "
                f"a batch of {batch_size}; "
                "lower train.batching.block_size or train.batching.batch_size"
            )
        self.ids, self.block, self.batch_size, self.seed = ids, block, batch_size, seed
        self.n_blocks = n_blocks
        self.batches = n_blocks // batch_size
        self._offsets = torch.arange(block + 1)
        self._order: tuple[int, Tensor] | None = None

    def to(self, device: torch.device | str) -> BlockPlan:
        self.ids = self.ids.to(device)
        return self

    def order(self, epoch: int) -> Tensor:
        """The block order of (0-based) ``epoch`` (a function of the seed and the epoch alone)."""
        if self._order is None or self._order[0] != epoch:
            self._order = (
                epoch,
                torch.randperm(self.n_blocks, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)),
            )
        return self._order[1]

    def batch(self, epoch: int, index: int) -> Window:
        """Batch ``index`` of ``epoch``: ``(B, block)`` inputs and targets."""
        rows = self.order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        stream_index = (rows * self.block).unsqueeze(
            1
        ) + self._offsets  # (B, block + 1), built per batch (WikiText-103: 200K blocks)
        data = self.ids[stream_index.to(self.ids.device)].long()
        positions = stream_index[:, 1:]
        return Window(data[:, :-1], data[:, 1:], None, positions, positions.numel(), positions.numel())
