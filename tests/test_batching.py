"""batchify / get_batch against a plain-Python reference of the batch-first BPTT layout."""

from __future__ import annotations

import pytest
import torch

from reglm.data.batching import batchify, get_batch
from reglm.errors import ReglmError


def reference_streams(ids: list[int], batch_size: int) -> list[list[int]]:
    length = len(ids) // batch_size
    return [ids[b * length : (b + 1) * length] for b in range(batch_size)]


@pytest.mark.parametrize(("n", "batch_size"), [(23, 4), (20, 4), (10, 1), (6, 3)])
def test_batchify_matches_reference(n: int, batch_size: int) -> None:
    ids = torch.arange(100, 100 + n)
    data = batchify(ids, batch_size)
    assert data.shape == (batch_size, n // batch_size)
    assert data.tolist() == reference_streams(ids.tolist(), batch_size)


def test_batchify_too_short() -> None:
    with pytest.raises(ReglmError, match="batch size 4"):
        batchify(torch.arange(7), 4)
    assert batchify(torch.arange(8), 4).shape == (4, 2)


def test_get_batch_windows_cover_each_stream() -> None:
    ids = torch.randint(0, 50, (37,))
    data = batchify(ids, 3)  # (3, 12)
    streams = reference_streams(ids.tolist(), 3)
    seen_x: list[list[int]] = [[] for _ in range(3)]
    seen_y: list[list[int]] = [[] for _ in range(3)]
    lengths = []
    start = 0
    while start < data.size(1) - 1:
        x, y = get_batch(data, start, 5)
        lengths.append(x.size(1))
        assert x.shape == y.shape == (3, x.size(1))
        for b in range(3):
            for t in range(x.size(1)):
                assert x[b, t].item() == streams[b][start + t]
                assert y[b, t].item() == streams[b][start + t + 1]
            seen_x[b] += x[b].tolist()
            seen_y[b] += y[b].tolist()
        start += x.size(1)
    assert lengths == [5, 5, 1]  # the last window is partial: 11 targets per stream
    for b in range(3):
        assert seen_x[b] == streams[b][:-1]
        assert seen_y[b] == streams[b][1:]


def test_get_batch_bounds() -> None:
    data = batchify(torch.arange(20), 2)  # (2, 10)
    x, y = get_batch(data, 8, 35)
    assert x.tolist() == [[8], [18]] and y.tolist() == [[9], [19]]
    with pytest.raises(ValueError):
        get_batch(data, 9, 5)
    with pytest.raises(ValueError):
        get_batch(data, 0, 0)
