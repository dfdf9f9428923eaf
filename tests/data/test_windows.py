"""The window planner against plain-Python references: the papers' trimmed streams for training,
every target exactly once for scoring, context windows, word counts."""

from __future__ import annotations

import pytest
import torch

from reglm.data.sentence_plan import SentencePlan
from reglm.data.windows import BlockPlan, ContextPlan, StreamPlan
from reglm.errors import ReglmError


def reference_streams(ids: list[int], batch_size: int) -> list[list[int]]:
    length = len(ids) // batch_size
    return [ids[b * length : (b + 1) * length] for b in range(batch_size)]


@pytest.mark.parametrize(("n", "batch_size"), [(23, 4), (20, 4), (10, 1), (6, 3)])
def test_trim_cover_is_the_papers_batching(n: int, batch_size: int) -> None:
    ids = torch.arange(100, 100 + n)
    plan = StreamPlan(ids, batch_size, "trim")
    assert plan.data.tolist() == reference_streams(ids.tolist(), batch_size)
    assert plan.columns == n // batch_size - 1


def test_trim_cover_too_short() -> None:
    with pytest.raises(ReglmError, match="batch size 4"):
        StreamPlan(torch.arange(7), 4, "trim")
    assert StreamPlan(torch.arange(8), 4, "trim").data.shape == (4, 2)


def test_trim_windows_cover_each_stream() -> None:
    ids = torch.randint(0, 50, (37,))
    plan = StreamPlan(ids, 3, "trim")  # rows of 12
    streams = reference_streams(ids.tolist(), 3)
    seen_x: list[list[int]] = [[] for _ in range(3)]
    seen_y: list[list[int]] = [[] for _ in range(3)]
    lengths = [w.inputs.size(1) for w in plan.windows(5)]
    for w in plan.windows(5):
        assert w.scored is None and w.tokens == w.words == w.inputs.numel()
        for b in range(3):
            seen_x[b] += w.inputs[b].tolist()
            seen_y[b] += w.targets[b].tolist()
            assert w.positions[b].tolist() == [b * 12 + w.start + t + 1 for t in range(w.inputs.size(1))]
    assert lengths == [5, 5, 1]
    for b in range(3):
        assert seen_x[b] == streams[b][:-1] and seen_y[b] == streams[b][1:]


def test_window_bounds() -> None:
    plan = StreamPlan(torch.arange(20), 2, "trim")
    w = plan.window(8, 35)
    assert w.inputs.tolist() == [[8], [18]] and w.targets.tolist() == [[9], [19]]
    with pytest.raises(ValueError):
        plan.window(9, 5)
    with pytest.raises(ValueError):
        plan.window(0, 0)


@pytest.mark.parametrize("n", [2, 17, 50, 101])
@pytest.mark.parametrize("batch_size", [1, 3, 10])
def test_all_cover_scores_every_target_once(n: int, batch_size: int) -> None:
    if n - 1 < batch_size:
        with pytest.raises(ReglmError, match="too few for batch size"):
            StreamPlan(torch.arange(n), batch_size, "all")
        return
    ids = torch.randint(0, 1000, (n,))
    plan = StreamPlan(ids, batch_size, "all")
    seen: list[int] = []
    for w in plan.windows(4):
        mask = w.positions >= 0 if w.scored is None else w.scored
        assert torch.equal(mask, w.positions >= 0)
        pos = w.positions[mask]
        assert torch.equal(w.targets[mask], ids[pos]), "a target is the token at its position"
        assert torch.equal(w.inputs[mask], ids[pos - 1]), "its input is the token before it"
        assert w.tokens == w.words == int(mask.sum())
        seen += pos.tolist()
    assert sorted(seen) == list(range(1, n)), "every target but position 0, once"
    assert plan.tokens == n - 1


def test_all_cover_at_batch_1_is_one_stream() -> None:
    ids = torch.arange(30)
    plan = StreamPlan(ids, 1, "all")
    assert plan.data.tolist() == [list(range(30))]
    assert [w.inputs.size(1) for w in plan.windows(7)] == [7, 7, 7, 7, 1]


def test_all_cover_streams_are_contiguous_and_overlap_by_one_token() -> None:
    ids = torch.arange(11)  # 10 targets in 3 streams: 4, 3, 3
    plan = StreamPlan(ids, 3, "all")
    assert plan.target_pos.tolist() == [[1, 2, 3, 4], [5, 6, 7, -1], [8, 9, 10, -1]]
    assert plan.data[:, 0].tolist() == [0, 4, 7], "each stream starts on the token before its first target"


def test_word_counts() -> None:
    ids = torch.arange(9)
    ends = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    plan = StreamPlan(ids, 2, "all", word_ends=ends)
    assert sum(w.words for w in plan.windows(3)) == int(ends[1:].sum())
    context = ContextPlan(ids, block=4, context=2, word_ends=ends)
    assert sum(w.words for w in context.windows()) == int(ends[1:].sum())


@pytest.mark.parametrize(
    ("n", "block", "context", "batch"), [(2, 1, 0, 1), (20, 5, 0, 2), (20, 5, 3, 2), (37, 8, 7, 3), (100, 16, 10, 4)]
)
def test_context_windows_score_every_target_once(n: int, block: int, context: int, batch: int) -> None:
    ids = torch.randint(0, 1000, (n,))
    plan = ContextPlan(ids, block, context, batch)
    seen: list[int] = []
    for w in plan.windows():
        assert w.inputs.size(1) <= block
        pos = w.positions[w.scored]
        assert torch.equal(w.targets[w.scored], ids[pos]) and torch.equal(w.inputs[w.scored], ids[pos - 1])
        for row in range(w.inputs.size(0)):
            scored = w.positions[row][w.positions[row] >= 0]
            if scored.numel() and scored[0] > 1:
                first = int(scored[0])
                lead = int((w.positions[row] < 0).cumprod(0).sum())
                assert lead == min(context, first - 1), "the context is the tokens just before the scored ones"
        seen += pos.tolist()
    assert sorted(seen) == list(range(1, n))


def test_context_zero_is_plain_blocks() -> None:
    ids = torch.arange(13)
    plan = ContextPlan(ids, block=4, context=0)
    assert [w.positions[0].tolist() for w in plan.windows()] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]


def test_context_must_be_smaller_than_the_block() -> None:
    with pytest.raises(ReglmError, match="context"):
        ContextPlan(torch.arange(10), block=4, context=4)


def test_context_windows_end_at_sentence_ends() -> None:
    eos = 0
    ids = torch.tensor([5, 6, 0, 7, 8, 9, 0, 1, 2, 0, 3, 4, 5, 6, 7, 8, 0])
    plan = ContextPlan(ids, block=6, context=2, sentence_ends=ids == eos)
    seen = []
    for w in plan.windows():
        pos = w.positions[w.scored]
        last = int(pos[-1])
        assert ids[last] == eos or last == ids.numel() - 1 or all(ids[p] != eos for p in pos), (
            "a block's scored part stops at a sentence end inside it"
        )
        seen += pos.tolist()
    assert sorted(seen) == list(range(1, ids.numel()))


def split_sentences(ids: list[int], eos: int) -> list[list[int]]:
    """Plain-Python reference: the stream's positions cut after every eos."""
    out, current = [], []
    for i, token in enumerate(ids):
        current.append(i)
        if token == eos:
            out.append(current)
            current = []
    return out + ([current] if current else [])


@pytest.mark.parametrize("max_tokens", [1, 8, 20, 1000])
def test_sentence_plan_scores_every_target_once_from_its_sentence(max_tokens: int) -> None:
    g = torch.Generator().manual_seed(0)
    eos = 0
    ids = torch.randint(1, 50, (120,), generator=g)
    ids[torch.randint(0, 120, (25,), generator=g)] = eos
    plan = SentencePlan(ids, eos, max_tokens, seed=3)
    sentences = split_sentences(ids.tolist(), eos)
    rows = []
    for w in plan.windows():
        assert w.inputs.numel() <= max_tokens, "a batch stays within the budget, a longer sentence is cut into pieces"
        for row in range(w.inputs.size(0)):
            pos = w.positions[row][w.scored[row]]
            assert torch.equal(w.targets[row][w.scored[row]], ids[pos]) and torch.equal(
                w.inputs[row][w.scored[row]], ids[pos - 1]
            )
            rows.append(pos.tolist())
    expected = [s if s[0] > 0 else s[1:] for s in sentences]
    pieces = [r[k : k + max_tokens] for r in expected for k in range(0, len(r), max_tokens)]
    assert sorted(rows) == sorted(pieces), (
        "a row per sentence (per piece of max_tokens), from the token before it to its eos"
    )
    assert sorted(p for r in rows for p in r) == list(range(1, ids.numel()))


def test_sentence_plan_groups_similar_lengths_and_shuffles_per_epoch() -> None:
    eos = 0
    lengths = [3, 9, 2, 9, 3, 2, 5, 5, 9, 2]
    ids = torch.cat([torch.cat([torch.full((n - 1,), 7), torch.tensor([eos])]) for n in lengths])
    plan = SentencePlan(ids, eos, max_tokens=10, seed=1)
    widths = [(plan.last[rows] - plan.first[rows] + 1).tolist() for rows in map(plan.group, range(plan.batches))]
    assert all(max(w) - min(w) <= 3 for w in widths) and sorted(sum(widths, [])) == sorted(
        [n if i else n - 1 for i, n in enumerate(lengths)]
    )
    assert plan.order(0).tolist() == SentencePlan(ids, eos, 10, seed=1).order(0).tolist(), (
        "the order is a function of seed and epoch"
    )
    orders = {tuple(plan.order(epoch).tolist()) for epoch in range(6)}
    assert len(orders) > 1 and all(sorted(o) == list(range(plan.batches)) for o in orders)


def test_block_plan_reads_each_block_once_per_epoch() -> None:
    ids = torch.arange(50)
    plan = BlockPlan(ids, block=6, batch_size=2, seed=0)
    starts = []
    for index in range(plan.batches):
        w = plan.batch(1, index)
        assert torch.equal(w.targets, w.inputs + 1) and w.inputs.shape == (2, 6)
        starts += w.inputs[:, 0].tolist()
    assert sorted(starts) == [0, 6, 12, 18, 24, 30, 36, 42]


def old_sentence_batches(ids: torch.Tensor, eos: int, max_tokens: int, seed: int) -> list[list[tuple[int, int]]]:
    """The sentence grouping as it was written first, a Python loop over (first, last) spans, each
    longer than ``max_tokens`` cut into pieces of ``max_tokens``: the reference the tensor plan must
    reproduce exactly (same batches, same order)."""
    ends = torch.nonzero(ids == eos).flatten().tolist()
    if not ends or ends[-1] < ids.numel() - 1:
        ends.append(ids.numel() - 1)
    spans, first = [], 1
    for end in ends:
        if end >= first:
            spans.append((first, end))
        first = end + 1
    spans = [
        (begin, min(begin + max_tokens - 1, last))
        for first, last in spans
        for begin in range(first, last + 1, max_tokens)
    ]
    lengths = torch.tensor([last - begin + 1 for begin, last in spans], dtype=torch.float64)
    tiebreak = torch.rand(len(spans), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    groups: list[list[tuple[int, int]]] = [[]]
    for i in torch.argsort(lengths + tiebreak).tolist():
        width = int(lengths[i])
        if groups[-1] and width * (len(groups[-1]) + 1) > max_tokens:
            groups.append([])
        groups[-1].append(spans[i])
    return groups


@pytest.mark.parametrize(("max_tokens", "seed"), [(1, 0), (7, 1), (20, 2), (64, 3), (10_000, 4)])
def test_sentence_plan_groups_exactly_as_the_loop_did(max_tokens: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 9, (3000,), generator=g)
    ids[torch.randint(0, 3000, (300,), generator=g)] = 0
    ids[100:104] = 0  # blank lines: sentences of their end alone
    plan = SentencePlan(ids.to(torch.int32), 0, max_tokens, seed=seed)
    expected = old_sentence_batches(ids, 0, max_tokens, seed)
    got = [
        list(zip(plan.first[rows].tolist(), plan.last[rows].tolist())) for rows in map(plan.group, range(plan.batches))
    ]
    assert got == expected
    batch = plan.batch(2, 0)
    assert batch.inputs.dtype == torch.long and torch.equal(
        batch.targets[batch.scored], ids[batch.positions[batch.scored]]
    )


def test_stream_shards_are_disjoint_views_that_together_are_the_streams() -> None:
    ids = torch.arange(1, 202, dtype=torch.int32)
    whole = StreamPlan(ids, 4, "trim")
    halves = [StreamPlan(ids, 4, "trim", shard=(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat([h.data for h in halves]), whole.data)
    assert all(h.data.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr() for h in halves), (
        "views of the stream, no copy"
    )
    for h, rows in zip(halves, (slice(0, 2), slice(2, 4))):
        window, reference = h.window(3, 5), whole.window(3, 5)
        assert torch.equal(window.inputs, reference.inputs[rows]) and torch.equal(
            window.positions, reference.positions[rows]
        )
    assert sum(h.tokens for h in halves) == whole.tokens
