"""The window planner against plain-Python references: the papers' trimmed streams for training,
every target exactly once for scoring, context windows, word counts."""

from __future__ import annotations

import pytest
import torch

from reglm.data.windows import ContextPlan, StreamPlan
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


@pytest.mark.parametrize(("n", "block", "context", "batch"), [(2, 1, 0, 1), (20, 5, 0, 2), (20, 5, 3, 2), (37, 8, 7, 3), (100, 16, 10, 4)])
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
