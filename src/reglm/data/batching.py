"""Batch-first BPTT batching of a token stream (Zaremba et al. 2014; AWD-LSTM, Merity et al. 2017).

The stream is cut into ``B`` contiguous streams, one per batch row, and consumed left to right
in windows; the target of each position is the next token of the same row. Unlike the
reference ``word_language_model`` code (time-major ``(L, B)``), tensors here are ``(B, L)``.
"""

from __future__ import annotations

import torch

from reglm.errors import ReglmError


def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(N,)`` ids -> ``(B, N // B)``: row ``b`` is the ``b``-th contiguous slice of the stream.

    The last ``N % B`` tokens are dropped. The result is a view of ``ids``. Raises
    :class:`ReglmError` when a row would hold fewer than 2 tokens (no input/target pair).
    """
    if ids.dim() != 1:
        raise ValueError(f"expected a 1-D id stream, got shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} must be >= 1")
    length = ids.numel() // batch_size
    if length < 2:
        raise ReglmError(
            f"a stream of {ids.numel()} tokens is too short for batch size {batch_size} "
            "(each row needs at least 2 tokens); lower the batch size or use more data"
        )
    return ids[: length * batch_size].view(batch_size, length)


def get_batch(data: torch.Tensor, start: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the window at column ``start`` of ``data`` ``(B, L)``.

    ``x = data[:, start:start+s]`` and ``y = data[:, start+1:start+1+s]``, both ``(B, s)`` with
    ``s = min(seq_len, L - 1 - start)`` (the last window of an epoch may be shorter). Views.
    """
    length = data.size(1)
    if not 0 <= start < length - 1:
        raise ValueError(f"start {start} outside [0, {length - 1}) for data of length {length}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    s = min(seq_len, length - 1 - start)
    return data[:, start : start + s], data[:, start + 1 : start + 1 + s]
