"""Fine-tuning with a discriminator: reverse KL-divergence estimated from a discriminator
(Popov & Kudinov, 2019, "Fine-tuning of Language Models with Discriminator", sections 2.1-3).

Notation. For a context ``c`` the discriminator has the language model's architecture and
outputs one logit ``s_w`` per vocabulary word; ``r(w|c) = sigmoid(s_w)`` is the probability that
``w`` came from the frozen initial model ``q0`` rather than from the data ``p``. Everything is
computed in log space from the logits, never dividing by ``r`` or ``1 - r``::

    log r = logsigmoid(s),   log(1 - r) = logsigmoid(-s),   r / (1 - r) = exp(s)

* **Discriminator loss**, eq. (4)-(6): per real token ``w*``,
  ``D_hat = -sum_w q0(w|c) log r(w|c) - log(1 - r(w*|c))`` -- the ``D^(q)`` term is an exact
  expectation over the whole vocabulary (not sampled), the ``D^(p)`` term is the one-sample
  estimate of eq. (5). With the optimal discriminator of eq. (7), ``r = q0 / (q0 + p)``, i.e.
  ``s = log q0 - log p``; the loss is ``log 4`` when ``q0 = p`` (the line of the paper's Figure 3).
* **Estimate of p**, eq. (8): ``log p_hat = log q0 + log(1 - r) - log r = log q0 - s``
  (unnormalized in general).
* **Fine-tuning loss**, eq. (11)-(12): ``log t = log q_theta(w*) - log q0(w*) + s_{w*}`` (i.e.
  ``log q_theta - log p_hat``) and ``L_hat = -log q_theta(w*) + t log t``. The mean of ``t log t``
  over real tokens is the estimate of the reverse KL ``KL(q_theta || p)`` of eq. (10) with
  ``p_hat`` plugged in (Table 2's "Val. rev. KL-div."). The "without discriminator" ablation of
  Table 2 takes ``r = 0.5``, i.e. ``s = 0`` (``disc_logit_target=None``), so ``t = q_theta / q0``.
  The gradient with respect to ``q_theta`` is ``-1/q + (1/p_hat)(1 + log(q/p_hat))`` (eq. 13):
  negative below ``p_hat``, positive above it, ``-+2 eps / p_hat^2`` near it (eqs. 14-15).

Only ``q_theta`` is trained during fine-tuning: :func:`finetune_loss` detaches ``q0`` and the
discriminator logits, and :func:`discriminator_loss` detaches ``q0``.

**Overflow of** ``t log t = exp(log t) * log t``. By default it is computed exactly. In float32
the value and its gradient ``exp(l) (1 + l)`` are finite for ``log t <= 84`` and for any finite
negative ``log t``; above ~84.5 both are ``+inf`` (never NaN: ``exp`` overflows only for positive
``log t``, and underflows to ``0 * log t = -0`` for very negative ``log t``). We do
not clamp by default: ``log t > 80`` means ``q_theta / p_hat > 5e34``, which a sane model and
discriminator never produce (``log q_theta <= 0``, and it needs ``log q0(w*) - s_{w*} < -80``),
so an ``inf`` is a loud symptom of a broken input rather than something to hide -- and a flat
clamp would silently zero the ``t log t`` gradient there, leaving ``-log q`` to push ``q_theta``
*up*, the opposite of eq. (15). For callers who want a guard anyway, ``max_log_t=L`` continues
``t log t`` linearly beyond ``L`` (value and slope of the exact function at ``L``): unchanged for
``log t <= L``, continuous with a continuous derivative, the gradient keeps its sign (pushes
``q_theta`` down) and is the constant ``exp(L) (1 + L)`` there (``L <= 84`` for float32); the
value stays finite while ``exp(L) (1 + L) (log t - L)`` is representable (``L = 30``: up to
``log t ~ 1e24`` in float32). Feed float32 or float64; half precision overflows at ``log t ~ 9``.

**Mixture of softmaxes.** The paper's discriminator has the language model's architecture and
applies a sigmoid to "the logits". A mixture of softmaxes has ``K`` expert logit vectors ``z_k``
and a prior ``pi`` but no single logit vector; our reading
(:meth:`~reglm.outputs.mixture.MixtureOfSoftmaxes.logits`) is the
unnormalized log-mixture ``log sum_k pi_k exp(z_{k,w})``: it is the plain logits when ``K = 1``,
and the same log-space mixing that gives the MoS log-probabilities when applied to the experts'
*normalized* log-probabilities. (The MoS log-probabilities themselves cannot serve as
discriminator logits: they are ``<= 0``, which would confine ``r`` to ``<= 1/2``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def discriminator_loss_parts(disc_logits: Tensor, q0_log_probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The ``D^(q)`` and ``D^(p)`` terms of eq. (5), per token, as estimated in eq. (6).

    ``disc_logits: (..., V)`` the discriminator's logits ``s``; ``q0_log_probs: (..., V)`` the
    frozen initial model's normalized log-probabilities (detached here); ``targets: (...)`` the
    real next words ``w*``. Returns ``(d_q, d_p)``, each ``(...)``:

    * ``d_q = -sum_w q0(w|c) log r(w|c) = sum_w q0(w|c) softplus(-s_w)`` (exact over the vocabulary);
    * ``d_p = -log(1 - r(w*|c)) = softplus(s_{w*})``.

    Both are finite for any finite logits (``softplus`` never overflows to NaN).
    """
    q0 = q0_log_probs.detach().exp()
    d_q = (q0 * F.softplus(-disc_logits)).sum(dim=-1)
    target_logits = disc_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    d_p = F.softplus(target_logits)
    return d_q, d_p


def discriminator_loss(disc_logits: Tensor, q0_log_probs: Tensor, targets: Tensor) -> Tensor:
    """Eq. (6) per token: ``-sum_w q0(w|c) log r(w|c) - log(1 - r(w*|c))``.

    ``disc_logits: (..., V)``, ``q0_log_probs: (..., V)`` (treated as constants: detached),
    ``targets: (...)`` -> ``(...)``. Exact over the whole vocabulary (not sampled). Averaging over
    real contexts gives the ``D(phi)`` the paper minimizes.
    """
    d_q, d_p = discriminator_loss_parts(disc_logits, q0_log_probs, targets)
    return d_q + d_p


def log_p_hat(q0_log_probs: Tensor, disc_logits: Tensor) -> Tensor:
    """Eq. (8): ``log p_hat(w|c) = log q0(w|c) + log(1 - r) - log r = log q0 - s``.

    ``q0_log_probs: (..., V)`` (or any matching shape, e.g. targets only), ``disc_logits`` the same
    shape -> the same shape. Unnormalized in general (normalized only for an optimal
    discriminator, eq. 7). A plain formula: nothing is detached.
    """
    return q0_log_probs - disc_logits


def log_t(log_q_target: Tensor, log_q0_target: Tensor, disc_logit_target: Tensor | None) -> Tensor:
    """Eq. (11) in log space: ``log t = log q_theta(w*|c) - log q0(w*|c) + s_{w*}``.

    All inputs ``(...)`` (the target word's entries) -> ``(...)``. ``disc_logit_target=None`` is
    the "without discriminator" ablation ``r = 0.5``, i.e. ``s = 0`` (Table 2), giving
    ``t = q_theta / q0``. Equals ``log q_theta - log p_hat`` (eq. 8). Nothing is detached here.
    """
    out = log_q_target - log_q0_target
    return out if disc_logit_target is None else out + disc_logit_target


def t_log_t(log_t_value: Tensor, max_log_t: float | None = None) -> Tensor:
    """``t log t = exp(log t) * log t``, elementwise, from ``log t: (...)`` -> ``(...)``.

    Exact when ``max_log_t`` is None (``+inf`` beyond ``log t ~ 84.5`` in float32; see the module
    docstring). With ``max_log_t = L``: exact for ``log t <= L`` and continued linearly above,
    ``exp(L) L + exp(L) (1 + L) (log t - L)`` (continuous, continuous derivative), so the gradient
    stays finite and keeps its sign.
    """
    if max_log_t is None:
        return log_t_value.exp() * log_t_value
    clamped = log_t_value.clamp(max=max_log_t)
    slope = torch.tensor(max_log_t, dtype=log_t_value.dtype, device=log_t_value.device)
    slope = slope.exp() * (1 + slope)
    return clamped.exp() * clamped + slope * F.relu(log_t_value - max_log_t)


def finetune_loss(
    log_q_target: Tensor,
    log_q0_target: Tensor,
    disc_logit_target: Tensor | None,
    max_log_t: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. (12) per token: ``-log q_theta(w*|c) + t log t``, with ``t`` from eq. (11).

    ``log_q_target: (...)`` the fine-tuned model's log-probability of the real next word (the only
    input gradients flow into), ``log_q0_target: (...)`` the frozen initial model's,
    ``disc_logit_target: (...)`` the frozen discriminator's logit for it, or None for the
    ``r = 0.5`` ablation. ``q0`` and the discriminator are detached.

    Returns ``(loss, tlogt)``, both ``(...)``: ``loss`` carries the graph; ``tlogt`` is detached,
    for reporting -- its mean over real tokens is the reverse-KL estimate (eq. 10 with ``p_hat``
    plugged in). ``max_log_t``: see :func:`t_log_t`.
    """
    disc = None if disc_logit_target is None else disc_logit_target.detach()
    lt = log_t(log_q_target, log_q0_target.detach(), disc)
    tlogt = t_log_t(lt, max_log_t)
    return -log_q_target + tlogt, tlogt.detach()
