"""Softmax output layer, tied or not (AWD-LSTM 4.4)."""

from __future__ import annotations

import pytest
import torch

from reglm.outputs.softmax import SoftmaxOutput


def test_untied_layer_owns_weight_with_expected_init() -> None:
    out = SoftmaxOutput(8, 30)
    assert out.weight.shape == (30, 8) and out.bias.shape == (30,)
    assert out.weight.abs().max() <= 0.1 and out.weight.abs().max() > 0.09
    assert torch.equal(out.bias, torch.zeros(30))


def test_logits_match_affine_map() -> None:
    out = SoftmaxOutput(4, 11)
    with torch.no_grad():
        out.bias.uniform_(-1, 1)
    h = torch.randn(2, 3, 4)
    expected = torch.einsum("bte,ve->btv", h, out.weight) + out.bias
    torch.testing.assert_close(out.logits(h), expected, rtol=1e-6, atol=1e-6)


def test_log_probs_normalize() -> None:
    out = SoftmaxOutput(5, 17)
    with torch.no_grad():
        out.bias.uniform_(-2, 2)
    lp = out.log_probs(3 * torch.randn(4, 6, 5))
    assert lp.shape == (4, 6, 17)
    assert (lp <= 0).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4, 6), rtol=0, atol=1e-5)


def test_nll_is_minus_log_prob_of_target() -> None:
    out = SoftmaxOutput(5, 13)
    h = torch.randn(3, 7, 5)
    targets = torch.randint(0, 13, (3, 7))
    nll = out.nll_of(h, targets)
    assert nll.shape == (3, 7)
    expected = -out.log_probs(h).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(nll, expected, rtol=1e-5, atol=1e-6)


def test_tied_weight_is_shared_not_copied() -> None:
    emb = torch.nn.Embedding(20, 6)
    out = SoftmaxOutput(6, 20, tied_weight=emb.weight)
    assert out.weight is emb.weight
    with torch.no_grad():
        emb.weight[3].fill_(0.5)
    assert torch.equal(out.weight[3], torch.full((6,), 0.5))
    # A gradient through the output lands on the shared parameter.
    out.nll_of(torch.randn(2, 3, 6), torch.randint(0, 20, (2, 3))).sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


def test_tied_weight_shape_is_checked() -> None:
    emb = torch.nn.Embedding(20, 6)
    with pytest.raises(ValueError, match="tying"):
        SoftmaxOutput(7, 20, tied_weight=emb.weight)
