"""Dropout variants of AWD-LSTM (Merity et al., 2017) that reuse one mask for a whole pass.

* :class:`LockedDropout` -- variational dropout (section 4.2): one mask per sequence and
  feature, shared by every time step.
* :func:`embedding_dropout` -- embedding dropout (section 4.3): drops whole word types, i.e.
  rows of the embedding matrix, for the whole forward and backward pass (applied after the lookup).
* :func:`keep_mask` -- the Bernoulli keep mask all of them (and DropConnect on the recurrent
  weights, section 2, in :mod:`reglm.encoders.awd_lstm`) multiply by.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_p(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return float(p)


def keep_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """Dropout keep mask of ``shape``: i.i.d. ``Bernoulli(1 - p) / (1 - p)``, so ``E[mask] = 1``.

    Sampled as ``U >= p`` with ``U ~ Uniform[0, 1)`` (probability ``1 - p``) on ``like``'s device,
    in ``like``'s dtype (float32 for half types, so ``p`` is not rounded to 8 bits). On CPU this
    is faster than ``Tensor.bernoulli_`` (docs/benchmarks.md), which matters for DropConnect on
    the ``(4H, H)`` recurrent matrices at every step.
    """
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    mask = torch.rand(shape, device=like.device, dtype=dtype).ge_(p).div_(1.0 - p)
    return mask.to(like.dtype)


class LockedDropout(nn.Module):
    """Variational ("locked") dropout, AWD-LSTM section 4.2 (Gal & Ghahramani, 2016).

    For ``x: (B, T, D)`` a Bernoulli(1 - p) mask ``m: (B, 1, D)`` is sampled once per call and
    broadcast over the time axis, so every time step of a sequence loses the same features while
    each sequence of the batch gets its own mask. Kept entries are scaled by ``1 / (1 - p)`` so
    that ``E[m * x] = x``. The module is the identity in eval mode or when ``p == 0``.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = _check_p(p)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, T, D) -> (B, T, D)``."""
        if not self.training or self.p == 0.0:
            return x
        return x * keep_mask((x.size(0), 1, x.size(2)), self.p, x)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _DroppedLookup(torch.autograd.Function):
    """``weight[ids] * mask[ids]`` whose backward is the matrix form's: the rows' gradients summed
    per word type (the lookup's backward), then multiplied by the mask."""

    @staticmethod
    def forward(ctx: Any, ids: Tensor, weight: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(ids, mask)
        ctx.num_weights = weight.size(0)
        return F.embedding(ids, weight) * F.embedding(ids, mask)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        ids, mask = ctx.saved_tensors
        rows = torch.ops.aten.embedding_dense_backward(grad, ids, ctx.num_weights, -1, False)
        return None, rows * mask, None


def embedding_dropout(ids: Tensor, weight: Tensor, p: float, training: bool) -> Tensor:
    """Embedding dropout, AWD-LSTM section 4.3: ``ids: (B, T)`` embedded by ``weight: (V, E)``
    with whole word types dropped, ``(B, T, E)``.

    Each row (word type) is zeroed with probability ``p`` for the whole pass; kept rows are scaled
    by ``1 / (1 - p)``, so every occurrence of a dropped word in the batch disappears --
    variational dropout on the one-hot-to-embedding connection. The result is
    ``F.embedding(ids, weight * m)`` for the per-type mask ``m: (V, 1)`` (one :func:`keep_mask`
    draw of ``V`` values), computed without forming that ``(V, E)`` dropped matrix in the forward
    pass: the looked-up rows are multiplied by their words' mask entries (the same products), and
    the backward pass is the matrix form's (the gradient rows summed per word type, then times
    the mask), so values and gradients are bit for bit those of the matrix form. Kept rows get
    the sum over their occurrences scaled by ``1 / (1 - p)``, dropped rows zero. On WikiText-103
    this saves a 267,735 x E matrix per step. A plain lookup when not training or when ``p == 0``.
    """
    p = _check_p(p)
    if not training or p == 0.0:
        return F.embedding(ids, weight)
    return _DroppedLookup.apply(ids, weight, keep_mask((weight.size(0), 1), p, weight))
