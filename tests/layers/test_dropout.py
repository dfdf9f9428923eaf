"""Locked dropout (AWD-LSTM 4.2) and embedding dropout (AWD-LSTM 4.3)."""

from __future__ import annotations

import pytest
import torch

from reglm.layers.dropout import LockedDropout, embedding_dropout, keep_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_keep_mask_is_scaled_bernoulli(dtype: torch.dtype) -> None:
    p = 0.3
    like = torch.zeros(1, dtype=dtype)
    mask = keep_mask((200, 500), p, like)
    assert mask.shape == (200, 500) and mask.dtype == dtype
    kept = mask != 0
    torch.testing.assert_close(mask[kept], torch.full_like(mask[kept], 1 / (1 - p)))
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    assert abs(mask.double().mean().item() - 1.0) < 0.015


def test_locked_dropout_mask_constant_over_time_and_scaled() -> None:
    p = 0.3
    drop = LockedDropout(p).train()
    x = torch.ones(8, 20, 16)
    y = drop(x)
    # Every entry is 0 or 1 / (1 - p), and both occur.
    kept = y != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # The mask of a (sequence, feature) pair is the same at every time step.
    torch.testing.assert_close(y, y[:, :1, :].expand_as(y), rtol=0, atol=0)


def test_locked_dropout_masks_differ_across_batch_elements() -> None:
    drop = LockedDropout(0.5).train()
    y = drop(torch.ones(16, 4, 64))
    masks = (y[:, 0, :] != 0).float()
    distinct = {tuple(row.tolist()) for row in masks}
    assert len(distinct) == 16


def test_locked_dropout_applies_mask_to_input_values() -> None:
    drop = LockedDropout(0.25).train()
    x = torch.randn(4, 6, 10)
    y = drop(x)
    mask = y[:, :1, :] / x[:, :1, :]
    torch.testing.assert_close(y, x * mask, rtol=1e-6, atol=1e-6)


def test_locked_dropout_identity_in_eval_and_at_zero() -> None:
    x = torch.randn(3, 5, 7)
    assert LockedDropout(0.5).eval()(x) is x
    assert LockedDropout(0.0).train()(x) is x


def test_locked_dropout_preserves_expectation() -> None:
    p = 0.4
    drop = LockedDropout(p).train()
    x = torch.randn(1, 3, 5)
    samples = torch.stack([drop(x.expand(2000, 3, 5)) for _ in range(10)]).reshape(-1, 3, 5)
    torch.testing.assert_close(samples.mean(0), x[0], rtol=0, atol=0.06)


def test_locked_dropout_rejects_bad_probability() -> None:
    with pytest.raises(ValueError):
        LockedDropout(1.0)
    with pytest.raises(ValueError):
        LockedDropout(-0.1)


def _reference_embedding_dropout(ids: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """The (V, E) form: the whole matrix masked by one draw of a (V, 1) mask, then the lookup."""
    return torch.nn.functional.embedding(ids, weight * keep_mask((weight.size(0), 1), p, weight))


def test_embedding_dropout_drops_whole_rows_and_rescales() -> None:
    p = 0.5
    weight = torch.randn(200, 12)
    ids = torch.arange(200).view(4, 50)
    dropped = embedding_dropout(ids, weight, p, training=True).view(200, 12)
    zero_rows = (dropped == 0).all(dim=1)
    kept_rows = ~zero_rows
    # Rows are dropped or kept as a whole.
    assert torch.equal((dropped == 0).any(dim=1), zero_rows)
    assert 50 < int(zero_rows.sum()) < 150
    torch.testing.assert_close(dropped[kept_rows], weight[kept_rows] / (1 - p), rtol=1e-6, atol=0)


def test_embedding_dropout_equals_the_masked_matrix_form_values_and_gradients() -> None:
    p = 0.4
    weight = torch.randn(30, 6, requires_grad=True)
    ids = torch.randint(0, 30, (5, 17))
    grad = torch.randn(5, 17, 6)
    torch.manual_seed(3)
    fast = embedding_dropout(ids, weight, p, training=True)
    (fast_grad,) = torch.autograd.grad(fast, weight, grad)
    torch.manual_seed(3)
    slow = _reference_embedding_dropout(ids, weight, p)
    (slow_grad,) = torch.autograd.grad(slow, weight, grad)
    assert torch.equal(fast, slow), "the same mask draw and the same products"
    assert torch.equal(fast_grad, slow_grad), "the same summation, then the same products"
    assert (slow_grad == 0).all(dim=1).any(), "some word type was dropped"


def test_embedding_dropout_identity_in_eval_and_at_zero() -> None:
    weight = torch.randn(10, 4)
    ids = torch.tensor([[1, 2, 3, 1]])
    plain = torch.nn.functional.embedding(ids, weight)
    assert torch.equal(embedding_dropout(ids, weight, 0.3, training=False), plain)
    assert torch.equal(embedding_dropout(ids, weight, 0.0, training=True), plain)


def test_embedding_dropout_gradient_reaches_kept_rows_only() -> None:
    p = 0.3
    weight = torch.randn(50, 6, requires_grad=True)
    dropped = embedding_dropout(torch.arange(50).view(1, 50), weight, p, training=True)
    dropped.sum().backward()
    kept = (dropped[0] != 0).all(dim=1)
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(weight.grad[kept], torch.full_like(weight.grad[kept], 1 / (1 - p)))
    assert torch.equal(weight.grad[~kept], torch.zeros_like(weight.grad[~kept]))


def test_embedding_dropout_every_occurrence_of_a_word_shares_the_drop() -> None:
    weight = torch.randn(5, 3)
    ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    emb = embedding_dropout(ids, weight, 0.5, training=True)
    torch.testing.assert_close(emb[:, :5], emb[:, 5:], rtol=0, atol=0)
