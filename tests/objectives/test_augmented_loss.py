"""Inan et al.'s augmented loss (eqs. 3.1-3.7): against a direct KL, its gradient (eq. 3.4) and high-temperature
limit (eq. 4.3)."""

from __future__ import annotations

import pytest
import torch

from reglm.objectives.augmented_loss import augmented_kl, target_log_probs


def direct_kl(logits: torch.Tensor, targets: torch.Tensor, embedding: torch.Tensor, tau: float) -> torch.Tensor:
    """Reference: explicit softmaxes and ``sum_i p_i log(p_i / q_i)``."""
    sim = torch.exp(embedding[targets] @ embedding.T / tau)
    p = sim / sim.sum(dim=1, keepdim=True)
    e = torch.exp(logits / tau)
    q = e / e.sum(dim=1, keepdim=True)
    return (p * torch.log(p / q)).sum(dim=1)


def problem(n: int = 7, v: int = 11, e: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(n, v, dtype=torch.float64), torch.randint(0, v, (n,)), torch.randn(v, e, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0, 20.0])
def test_matches_direct_kl(tau: float) -> None:
    logits, targets, embedding = problem()
    got = augmented_kl(logits, targets, embedding, tau)
    assert got.shape == (7,) and got.dtype == torch.float64
    torch.testing.assert_close(got, direct_kl(logits, targets, embedding, tau), rtol=1e-10, atol=1e-13)
    assert bool((got >= 0).all())


def test_zero_when_logits_match_target_logits() -> None:
    _, targets, embedding = problem()
    logits = embedding[targets] @ embedding.T
    for tau in (0.7, 5.0):
        assert float(augmented_kl(logits, targets, embedding, tau).abs().max()) < 1e-12
        # softmax ignores a per-row shift of the logits (the output bias of a constant)
        shifted = logits + torch.randn(logits.size(0), 1, dtype=torch.float64)
        assert float(augmented_kl(shifted, targets, embedding, tau).abs().max()) < 1e-12


def test_bad_arguments() -> None:
    logits, targets, embedding = problem()
    for tau in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            augmented_kl(logits, targets, embedding, tau)
    with pytest.raises(ValueError, match="embedding"):
        augmented_kl(logits, targets, embedding[:-1], 1.0)
    with pytest.raises(ValueError):
        augmented_kl(logits, targets[:-1], embedding, 1.0)


def test_gradient_wrt_logits_is_eq_3_4() -> None:
    logits, targets, embedding = problem()
    for tau in (0.5, 2.0, 10.0):
        z = logits.clone().requires_grad_(True)
        augmented_kl(z, targets, embedding, tau).sum().backward()
        y_tilde = target_log_probs(targets, embedding, tau).exp()
        expected = (torch.softmax(logits / tau, dim=1) - y_tilde) / tau
        torch.testing.assert_close(z.grad, expected, rtol=1e-10, atol=1e-14)


def test_high_temperature_gradient_matches_logits_eq_4_3() -> None:
    """grad -> ((z - mean z) - (L^T u - mean L^T u)) / (tau^2 |V|) as tau -> infinity."""
    logits, targets, embedding = problem(n=5, v=40, e=6)
    v = logits.size(1)
    diff = logits - embedding[targets] @ embedding.T
    centered = diff - diff.mean(dim=1, keepdim=True)
    cosines, errors = [], []
    for tau in (1.0, 10.0, 100.0, 1000.0):
        z = logits.clone().requires_grad_(True)
        augmented_kl(z, targets, embedding, tau).sum().backward()
        cosines.append(float(torch.nn.functional.cosine_similarity(z.grad, centered, dim=1).min()))
        errors.append(float((z.grad * tau**2 * v - centered).norm() / centered.norm()))
    assert all(a < b for a, b in zip(cosines, cosines[1:])), cosines
    assert cosines[-1] > 0.999
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2


def test_target_gradient_switch() -> None:
    logits, targets, embedding = problem()
    z = logits.clone().requires_grad_(True)
    emb = embedding.clone().requires_grad_(True)
    augmented_kl(z, targets, emb, 2.0).sum().backward()
    assert emb.grad is None and z.grad is not None
    augmented_kl(z, targets, emb, 2.0, target_grad=True).sum().backward()
    assert emb.grad is not None and float(emb.grad.abs().max()) > 0
    # and that gradient is the true one of KL(y_tilde(L) || y_hat(z))
    assert torch.autograd.gradcheck(
        lambda a, b: augmented_kl(a, targets, b, 1.5, target_grad=True),
        (z.detach().requires_grad_(), emb.detach().requires_grad_()),
    )


def test_no_vocabulary_squared_memory() -> None:
    """A 50,000-word vocabulary: a V x V matrix would need 10 GB, the loss needs N x V."""
    v = 50_000
    logits, targets, embedding = torch.randn(3, v), torch.randint(0, v, (3,)), torch.randn(v, 4)
    out = augmented_kl(logits, targets, embedding, 10.0)
    assert out.shape == (3,) and bool(torch.isfinite(out).all())
