"""Adversarial softmax (AdvSoft; Wang, Gong & Liu 2019, section 3.1 and Algorithm 1).

Training maximizes the likelihood under the worst perturbation ``delta`` of the *target's*
output embedding within an epsilon-ball. Theorem 3.1 gives the minimizer in closed form,
``delta* = -epsilon h / ||h||`` (eq. 6), so the perturbed target logit is (eq. 7)::

    w_y . h + b_y  ->  w_y . h + b_y - epsilon_y ||h||

and every other logit is unchanged. This module computes the per-token margin
``m_t = epsilon_t ||h_t||`` and subtracts it from the target logit of each token in place: two
occurrences of one word in a batch get their own ``-epsilon h_t / ||h_t||``, and nothing of size
``V x d`` is ever allocated (the only extra tensors are ``(N, d)`` gathers and ``(N,)`` vectors).

Choices, each an option of :class:`AdvSoft`:

``epsilon``
    ``alpha * ||w_y||`` per target word (the Remark after Algorithm 1; ``mode="relative"``) or
    one fixed ``epsilon`` (``mode="fixed"``).
``grad``
    ``"stop"`` (default): the margin is a constant, as in Algorithm 1 and section 3.1, which
    update the parameters "without back-propagating through the norm term epsilon ||h||";
    the gradient is that of cross-entropy on the shifted logits with the shift held fixed.
    ``"hidden"``: the gradient flows through ``||h||`` but not through ``epsilon_y``. This is what
    the authors' released code computes when each target word occurs once per batch and there
    is one expert, since it keeps the vector ``delta`` fixed and differentiates
    ``(w_y + delta) . h``, whose derivative in ``h`` equals that of ``-epsilon ||h||``. (The
    released MoS code stores ``delta`` in a ``V x d`` buffer indexed by target id, so repeated
    words of a batch, and all experts, share one perturbation; here it is per token and expert.) ``"full"``: through
    ``||h||`` and ``||w_y||`` both -- the paper's ablation,
    which it reports diverges within a few epochs.
``positive_only``
    The released code perturbs only tokens whose ``cos(h, w_y) > 0``; the paper perturbs every
    token. Default: the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from reglm.config.fields import check_kind, check_nonneg, kind_field, option

GRAD_MODES = ("stop", "hidden", "full")
EPSILON_MODES = ("relative", "fixed")


@dataclass(frozen=True)
class AdvSoft:
    """How the target logit is perturbed; see the module docstring."""

    mode: str = "relative"
    alpha: float = 0.005
    epsilon: float = 0.0
    grad: str = "stop"
    positive_only: bool = False

    def __post_init__(self) -> None:
        if self.mode not in EPSILON_MODES:
            raise ValueError(f"AdvSoft mode must be one of {EPSILON_MODES}, got {self.mode!r}")
        if self.grad not in GRAD_MODES:
            raise ValueError(f"AdvSoft grad must be one of {GRAD_MODES}, got {self.grad!r}")

    def margin(self, h: Tensor, target_weight: Tensor | None) -> Tensor:
        """``h: (N, d)``, ``target_weight: (N, d)`` rows ``w_{y_t}`` (only needed in relative mode
        or with ``positive_only``) -> ``(N,)`` margins ``epsilon_t ||h_t||``."""
        h_norm = h.norm(dim=-1)
        if self.grad == "stop":
            h_norm = h_norm.detach()
        if self.mode == "relative":
            assert target_weight is not None
            w_norm = target_weight.norm(dim=-1)
            if self.grad != "full":
                w_norm = w_norm.detach()
            margin = self.alpha * w_norm * h_norm
        else:
            margin = self.epsilon * h_norm
        if self.positive_only:
            assert target_weight is not None
            margin = margin * ((target_weight.detach() * h.detach()).sum(-1) > 0).to(margin.dtype)
        return margin

    def needs_target_weight(self) -> bool:
        return self.mode == "relative" or self.positive_only


@dataclass(frozen=True)
class AdvSoftConfig:
    """``model.output.advsoft``: the adversarial softmax of an output layer (``kind=none``: off)."""

    kind: str = kind_field(
        "none",
        "none (off), relative (epsilon_y = alpha * ||w_y||) or fixed (epsilon); Wang et al. 2019",
    )
    alpha: float = option(0.005, "relative mode: epsilon_y = alpha * ||w_y|| (the Remark after Algorithm 1)")
    epsilon: float = option(0.01, "fixed mode: the radius epsilon of the perturbation ball")
    grad: str = option(
        "stop",
        "gradient through the margin epsilon_y*||h||: stop (none; Algorithm 1), hidden (through ||h||, as the "
        "authors' code), full (ablation)",
    )
    positive_only: bool = option(
        False, "perturb only tokens with cos(h, w_y) > 0 (the authors' code; the paper perturbs all)"
    )

    def __post_init__(self) -> None:
        check_kind(self.kind, ("none", *EPSILON_MODES), "model.output.advsoft.kind")
        check_kind(self.grad, GRAD_MODES, "model.output.advsoft.grad")
        check_nonneg(self.alpha, "model.output.advsoft.alpha")
        check_nonneg(self.epsilon, "model.output.advsoft.epsilon")

    @property
    def enabled(self) -> bool:
        """Whether training perturbs the target logits (``kind`` is an epsilon mode, not none)."""
        return self.kind != "none"

    def build(self) -> AdvSoft | None:
        """The :class:`AdvSoft` settings, or None when off."""
        if not self.enabled:
            return None
        return AdvSoft(
            mode=self.kind, alpha=self.alpha, epsilon=self.epsilon, grad=self.grad, positive_only=self.positive_only
        )


def perturb_target_logits_(logits: Tensor, targets: Tensor, margin: Tensor) -> Tensor:
    """Subtract ``margin: (N,)`` from ``logits: (N, V)`` at ``targets: (N,)``, in place; returns ``logits``.

    ``logits`` must be a fresh tensor (e.g. the output of ``F.linear``) that autograd does not
    need to keep; the gradient passes unchanged to every logit and, negated, to ``margin``.
    """
    rows = torch.arange(targets.numel(), device=targets.device)
    return logits.index_put_((rows, targets), -margin.to(logits.dtype), accumulate=True)
