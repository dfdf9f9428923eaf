"""Discriminator fine-tuning (Popov & Kudinov 2019): eqs. (5)-(15) against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reglm.objectives.reverse_kl import (
    discriminator_loss,
    discriminator_loss_parts,
    finetune_loss,
    log_p_hat,
    log_t,
    t_log_t,
)
from reglm.outputs.mixture import MixtureOfSoftmaxes, log_mixture

D = torch.float64


def _dist(v: int, *batch: int) -> torch.Tensor:
    """Random log-probabilities ``(*batch, v)``, spread enough to have small and large entries."""
    return F.log_softmax(2 * torch.randn(*batch, v, dtype=D), dim=-1)


def _expected_disc_loss(s: torch.Tensor, log_q0: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Eq. (5): E_{w* ~ p} of eq. (6), as an exact expectation over all V targets."""
    v = s.numel()
    per_target = discriminator_loss(s.expand(v, v), log_q0.expand(v, v), torch.arange(v))
    return (log_p.exp() * per_target).sum()


# --- discriminator loss, eq. (6) -------------------------------------------------------------


def test_discriminator_loss_matches_direct_computation() -> None:
    v = 5
    s = 3 * torch.randn(2, 3, v, dtype=D)
    log_q0 = _dist(v, 2, 3)
    targets = torch.randint(v, (2, 3))
    got = discriminator_loss(s, log_q0, targets)
    d_q, d_p = discriminator_loss_parts(s, log_q0, targets)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            r = [1 / (1 + math.exp(-s[i, j, w].item())) for w in range(v)]
            q0 = [math.exp(log_q0[i, j, w].item()) for w in range(v)]
            want_q = -sum(q0[w] * math.log(r[w]) for w in range(v))
            want_p = -math.log(1 - r[targets[i, j].item()])
            assert d_q[i, j].item() == pytest.approx(want_q, rel=1e-12)
            assert d_p[i, j].item() == pytest.approx(want_p, rel=1e-12)
            assert got[i, j].item() == pytest.approx(want_q + want_p, rel=1e-12)


def test_discriminator_loss_is_log4_when_q0_equals_p() -> None:
    # The line of Figure 3: q0 = p gives the optimal s = 0, r = 1/2 and loss log 2 + log 2.
    log_p = _dist(6)
    assert _expected_disc_loss(torch.zeros(6, dtype=D), log_p, log_p).item() == pytest.approx(math.log(4), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discriminator_loss_stable_at_extreme_logits(dtype: torch.dtype) -> None:
    v = 6
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], dtype=dtype)
    s = (100 * sign).expand(v, v).clone().requires_grad_()
    log_q0 = F.log_softmax(torch.randn(v, dtype=dtype), dim=-1).expand(v, v)
    targets = torch.arange(v)
    loss = discriminator_loss(s, log_q0, targets)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    # Asymptotics: -log r ~ 100 where s = -100 (else ~0), -log(1 - r) ~ 100 where s = +100 (else ~0).
    d_q = 100 * log_q0[0].exp()[sign < 0].sum()
    want = d_q + 100 * (sign[targets] > 0).to(dtype)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-30)


def test_discriminator_loss_does_not_train_q0() -> None:
    s = torch.randn(4, 5, dtype=D, requires_grad=True)
    log_q0 = _dist(5, 4).requires_grad_()
    discriminator_loss(s, log_q0, torch.randint(5, (4,))).sum().backward()
    assert log_q0.grad is None and s.grad is not None


# --- optimal discriminator, eqs. (7)-(8) -----------------------------------------------------


def test_optimal_discriminator_recovers_p() -> None:
    log_p, log_q0 = _dist(7), _dist(7)
    s = log_q0 - log_p  # eq. (7): r = q0 / (q0 + p)
    p, q0 = log_p.exp(), log_q0.exp()
    torch.testing.assert_close(torch.sigmoid(s), q0 / (q0 + p), rtol=1e-12, atol=0)
    torch.testing.assert_close(log_p_hat(log_q0, s), log_p, rtol=1e-12, atol=1e-12)
    # Any other discriminator gives a different estimate.
    assert not torch.allclose(log_p_hat(log_q0, s + 0.1 * torch.randn(7, dtype=D)), log_p)


def test_optimal_discriminator_minimizes_expected_loss() -> None:
    log_p, log_q0 = _dist(7), _dist(7)
    s_opt = (log_q0 - log_p).requires_grad_()
    best = _expected_disc_loss(s_opt, log_q0, log_p)
    (grad,) = torch.autograd.grad(best, s_opt)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)
    # Closed form: d/ds_w = q0_w (r_w - 1) + p_w r_w, zero exactly when r_w = q0_w / (q0_w + p_w).
    s_opt = s_opt.detach()
    directions = [torch.randn(7, dtype=D) for _ in range(5)] + list(torch.eye(7, dtype=D))
    for d in directions:
        for scale in (1e-3, 1e-1, 1.0, 10.0):
            for sgn in (1, -1):
                moved = _expected_disc_loss(s_opt + sgn * scale * d, log_q0, log_p)
                assert moved.item() > best.item()


# --- t and the fine-tuning loss, eqs. (11)-(15) ----------------------------------------------


def test_log_t_without_and_with_optimal_discriminator() -> None:
    log_q, log_q0, log_p = _dist(7), _dist(7), _dist(7)
    q, q0, p = log_q.exp(), log_q0.exp(), log_p.exp()
    # r = 0.5 (s = 0) ablation: t = q_theta / q0.
    torch.testing.assert_close(log_t(log_q, log_q0, None).exp(), q / q0, rtol=1e-12, atol=0)
    torch.testing.assert_close(log_t(log_q, log_q0, torch.zeros(7, dtype=D)), log_t(log_q, log_q0, None))
    # Optimal discriminator: t = q_theta / p.
    torch.testing.assert_close(log_t(log_q, log_q0, log_q0 - log_p).exp(), q / p, rtol=1e-12, atol=0)
    # Eq. (11) literally: t = q/q0 * r/(1-r).
    s = torch.randn(7, dtype=D)
    r = torch.sigmoid(s)
    torch.testing.assert_close(log_t(log_q, log_q0, s).exp(), q / q0 * r / (1 - r), rtol=1e-12, atol=0)


def _grad_wrt_q(q_value: float, p_hat: float) -> float:
    """d L_hat / d q_theta by autograd, with q_theta the leaf and log q = log(q)."""
    q = torch.tensor(q_value, dtype=D, requires_grad=True)
    log_q0 = torch.tensor(math.log(0.3), dtype=D)
    s = log_q0 - math.log(p_hat)  # a discriminator giving p_hat (eq. 8)
    loss, _ = finetune_loss(torch.log(q), log_q0, s)
    (g,) = torch.autograd.grad(loss, q)
    return g.item()


def test_finetune_gradient_sign_and_closed_form() -> None:
    p_hat = 0.05
    for ratio in (1e-3, 0.1, 0.5, 0.9, 0.999, 1.001, 1.1, 2.0, 10.0):
        q = ratio * p_hat
        g = _grad_wrt_q(q, p_hat)
        want = -1 / q + (1 / p_hat) * (1 + math.log(q / p_hat))  # eq. (13)
        assert g == pytest.approx(want, rel=1e-10)
        # Proposition 1: a gradient step raises q_theta below p_hat and lowers it above.
        assert (g < 0) if ratio < 1 else (g > 0)
    assert _grad_wrt_q(p_hat, p_hat) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("sign", [-1, 1])
def test_finetune_gradient_taylor_forms(sign: int) -> None:
    # eq. (14) (q = p_hat - eps) and eq. (15) (q = p_hat + eps): sign * 2 eps / p^2 - 3/2 eps^2 / p^3 + o(eps^2).
    p_hat = 0.05
    for x in (1e-2, 1e-3, 1e-4):
        eps = x * p_hat
        g = _grad_wrt_q(p_hat + sign * eps, p_hat)
        first = sign * 2 * eps / p_hat**2
        second = -1.5 * eps**2 / p_hat**3
        assert abs(g - first) <= 2 * eps**2 / p_hat**3  # leading term, to O(eps^2)
        # Second order: the remainder is O(eps^3) (it is sign * 4/3 x^3 / p_hat).
        assert abs(g - first - second) <= 1.5 * x**3 / p_hat
        assert abs(g - first - second) >= 1.0 * x**3 / p_hat


def test_finetune_step_moves_q_toward_p_hat() -> None:
    # Through a softmax parametrization, v = grad_theta q: an SGD step moves q_theta toward p_hat.
    theta0 = torch.randn(5, dtype=D)
    target = 2
    log_q0 = F.log_softmax(theta0, dim=-1)[target]
    q_start = log_q0.exp().item()
    for p_hat in (q_start * 3, q_start / 3):
        theta = theta0.clone().requires_grad_()
        s = log_q0 - math.log(p_hat)
        loss, _ = finetune_loss(F.log_softmax(theta, dim=-1)[target], log_q0, s)
        loss.backward()
        with torch.no_grad():
            q_new = F.softmax(theta - 1e-2 * theta.grad, dim=-1)[target].item()
        assert (q_new > q_start) if p_hat > q_start else (q_new < q_start)


def test_finetune_loss_value_and_log_space_gradient() -> None:
    log_q = _dist(6, 3).requires_grad_()
    log_q0, s = _dist(6, 3), torch.randn(3, 6, dtype=D)
    loss, tlogt = finetune_loss(log_q, log_q0, s)
    t = log_q.detach().exp() / log_q0.exp() * s.exp()
    torch.testing.assert_close(tlogt, t * t.log(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(loss.detach(), -log_q.detach() + t * t.log(), rtol=1e-12, atol=1e-15)
    loss.sum().backward()
    torch.testing.assert_close(log_q.grad, -1 + t * (1 + t.log()), rtol=1e-12, atol=1e-15)


def test_finetune_loss_trains_only_q_theta() -> None:
    log_q = _dist(6, 4).requires_grad_()
    log_q0 = _dist(6, 4).requires_grad_()
    s = torch.randn(4, 6, dtype=D, requires_grad=True)
    loss, tlogt = finetune_loss(log_q, log_q0, s)
    assert tlogt.grad_fn is None
    loss.sum().backward()
    assert log_q.grad is not None and torch.count_nonzero(log_q.grad) > 0
    assert log_q0.grad is None and s.grad is None


# --- reverse-KL estimate, eq. (10) -----------------------------------------------------------


def test_reverse_kl_estimate_equals_kl_with_exact_p_hat() -> None:
    v = 6
    log_p, log_q, log_q0 = _dist(v), _dist(v), _dist(v)
    s = log_q0 - log_p  # p_hat = p
    _, tlogt = finetune_loss(log_q, log_q0, s)  # t log t for each possible w*
    kl_qp = (log_q.exp() * (log_q - log_p)).sum()
    torch.testing.assert_close((log_p.exp() * tlogt).sum(), kl_qp, rtol=1e-12, atol=1e-14)
    # The token mean: a token stream in which word w appears exactly n_w times, p = n / sum n.
    counts = torch.tensor([1, 2, 3, 4, 5, 5])
    log_p = (counts.to(D) / counts.sum()).log()
    s = log_q0 - log_p
    tokens = torch.repeat_interleave(torch.arange(v), counts)
    est = finetune_loss(log_q[tokens], log_q0[tokens], s[tokens])[1].mean()
    kl_qp = (log_q.exp() * (log_q - log_p)).sum()
    assert est.shape == () and est.item() == pytest.approx(kl_qp.item(), rel=1e-12)


# --- overflow --------------------------------------------------------------------------------


def test_t_log_t_finite_in_float32_up_to_80() -> None:
    lt = torch.linspace(-80, 80, 321, dtype=torch.float32, requires_grad=True)
    y = t_log_t(lt)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(lt.grad).all()
    torch.testing.assert_close(y.double(), lt.detach().double().exp() * lt.detach().double(), rtol=1e-5, atol=1e-30)
    # Far negative log t underflows to 0, never NaN.
    far = t_log_t(torch.tensor([-1e4, -1e30]))
    assert torch.equal(far, torch.zeros(2))


def test_t_log_t_guard_is_exact_below_and_linear_above() -> None:
    cap = 30.0
    lt = torch.tensor([-5.0, 0.0, 10.0, 29.9, 30.0, 30.1, 90.0, 1e3], dtype=D, requires_grad=True)
    y = t_log_t(lt, max_log_t=cap)
    y.sum().backward()
    below = lt.detach() <= cap
    torch.testing.assert_close(y.detach()[below], t_log_t(lt.detach()[below]))
    slope = math.exp(cap) * (1 + cap)
    torch.testing.assert_close(y.detach()[~below], math.exp(cap) * cap + slope * (lt.detach()[~below] - cap))
    torch.testing.assert_close(lt.grad[~below], torch.full((3,), slope, dtype=D))
    # float32: finite value and gradient even for very large log t.
    big = torch.tensor([1e3, 1e6], requires_grad=True)
    yb = t_log_t(big, max_log_t=cap)
    yb.sum().backward()
    assert torch.isfinite(yb).all() and torch.isfinite(big.grad).all() and (big.grad > 0).all()


# --- mixture-of-softmaxes discriminator logits -----------------------------------------------


def test_mixture_logits_single_expert_is_plain_logits() -> None:
    z = 5 * torch.randn(2, 3, 1, 8, dtype=D)
    torch.testing.assert_close(log_mixture(z, torch.zeros(2, 3, 1, dtype=D)), z.squeeze(-2), rtol=1e-14, atol=1e-14)


def test_mixture_logits_three_experts_direct() -> None:
    z = 3 * torch.randn(4, 3, 9, dtype=D)
    log_pi = F.log_softmax(torch.randn(4, 3, dtype=D), dim=-1)
    want = torch.log((log_pi.exp().unsqueeze(-1) * z.exp()).sum(dim=-2))
    got = log_mixture(z, log_pi)
    assert got.shape == (4, 9)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Stable where exp(z) overflows.
    assert torch.isfinite(log_mixture(z + 1000, log_pi)).all()


def test_mixture_logits_of_expert_log_probs_is_mos_log_probs() -> None:
    layer = MixtureOfSoftmaxes(in_features=6, emb_size=4, vocab_size=11, n_experts=3).double().eval()
    h = torch.randn(2, 3, 6, dtype=D)
    with torch.no_grad():
        log_prior, latent = layer.mixture(h)
        expert = F.linear(latent, layer.weight, layer.bias).view(-1, 3, 11)
        got = log_mixture(F.log_softmax(expert, dim=-1), log_prior).view(2, 3, 11)
        torch.testing.assert_close(got, layer.log_probs(h), rtol=1e-12, atol=1e-12)


def test_mixture_layer_logits_are_the_log_mixture_of_expert_logits() -> None:
    layer = MixtureOfSoftmaxes(in_features=6, emb_size=4, vocab_size=11, n_experts=3).double().eval()
    h = torch.randn(2, 3, 6, dtype=D)
    with torch.no_grad():
        log_prior, latent = layer.mixture(h)
        expert = F.linear(latent, layer.weight, layer.bias).view(2, 3, 3, 11)
        pi = log_prior.exp().view(2, 3, 3, 1)
        want = torch.log((pi * expert.exp()).sum(dim=2))
        torch.testing.assert_close(layer.logits(h), want, rtol=1e-12, atol=1e-12)
