"""The augmented loss of Inan, Khosravi & Socher (2017, "Tying Word Vectors and Word Classifiers"), section 3.

For one token with logits ``z = W h + b`` (``(V,)``), target word ``y*`` and input embedding
``L: (E, V)`` (column ``i`` is word ``i``'s vector; this module takes ``embedding = L^T: (V, E)``,
the layout of ``nn.Embedding.weight``):

* eq. 3.1: ``y_hat = softmax(z / tau)`` -- the model's prediction at temperature ``tau``;
* eq. 3.6: ``u = L y*`` -- the target word's vector, ``embedding[target]``;
* eq. 3.7: ``y_tilde = softmax(L^T u / tau)`` -- the estimated data distribution: words close to
  the target in the embedding space share its probability mass;
* eq. 3.2: ``J_aug = KL(y_tilde || y_hat)``;
* eq. 3.3: ``J_tot = J + alpha J_aug`` with ``J`` the cross-entropy; appendix A sets
  ``alpha = gamma * tau`` (``train.terms.aug_gamma``, ``train.terms.aug_tau``; the objective term
  :class:`AugmentedLoss`).

The gradient with respect to the logits is ``(y_hat - y_tilde) / tau`` (eq. 3.4; the paper's
rendering drops the ``1 / tau`` in places, the derivative of ``softmax(z / tau)`` has it). At
high temperature it tends to ``((z - mean z) - (L^T u - mean L^T u)) / (tau^2 |V|)`` (eq. 4.3,
with the means over the vocabulary that eq. 4.2's "on average zero" assumption drops): the
augmented loss then matches the logits to ``L^T u``, which is why the section-6.2 study scales
``J_aug`` by ``tau^2 |V|`` (eq. 6.1) and why ``W`` is driven into the column space of ``L^T``.

Where the gradient flows (an ambiguity of the paper). ``y_tilde`` depends on the embedding, which
is a trained parameter. The paper treats ``y_tilde`` as "some probability distribution that
estimates the true data distribution" -- a *target*, as the teacher's distribution in Hinton et
al.'s distillation, which section 5 names as the closest relative -- and differentiates
``J_aug`` with respect to the logits only (eq. 3.4). So by default (``target_grad=False``)
``y_tilde`` is a constant: the embedding receives no gradient through it (it still receives the
usual gradient through the input path ``x_t = L y_{t-1}`` and, when tied, through ``W``). The
other reading, ``target_grad=True``, differentiates ``KL(y_tilde || y_hat)`` through ``y_tilde``
too, which also pulls the embedding geometry towards the model's predictions.

Numerics: both distributions are kept as log-probabilities (``log_softmax``) and
``KL = sum_i exp(log y_tilde_i) (log y_tilde_i - log y_hat_i)``; memory is ``O(N V)`` -- the
``(N, V)`` similarities ``u L`` of the batch's targets, never a ``V x V`` matrix.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from reglm.objectives.base import TermInputs


def augmented_kl(logits: Tensor, targets: Tensor, embedding: Tensor, tau: float, target_grad: bool = False) -> Tensor:
    """Per-token augmented loss ``KL(y_tilde || y_hat)`` (eq. 3.2) -> ``(N,)``.

    * ``logits: (N, V)`` -- the model's output logits ``W h + b``;
    * ``targets: (N,)`` -- the target word ids ``y*``;
    * ``embedding: (V, E)`` -- the input embedding ``L^T`` (row ``i`` is word ``i``'s vector);
    * ``tau > 0`` -- the temperature of both softmaxes.

    ``y_hat = softmax(logits / tau)`` (eq. 3.1), ``u = embedding[targets]: (N, E)`` (eq. 3.6),
    ``y_tilde = softmax(u @ embedding.T / tau)`` (eq. 3.7). With ``target_grad=False`` (default)
    ``y_tilde`` is a constant target: no gradient reaches ``embedding`` through it (see the module
    docstring for why); ``True`` lets gradient flow through ``y_tilde`` too. The gradient with
    respect to ``logits`` is ``(y_hat - y_tilde) / tau`` per row (eq. 3.4) either way.

    Raises ValueError for ``tau <= 0`` (or not finite) or mismatched shapes.
    """
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"the temperature tau must be a finite number > 0, got {tau}")
    if (
        logits.dim() != 2
        or targets.shape != logits.shape[:1]
        or embedding.dim() != 2
        or embedding.size(0) != logits.size(1)
    ):
        raise ValueError(
            f"expected logits (N, V), targets (N,) and embedding (V, E); got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)} and {tuple(embedding.shape)}"
        )
    log_y_hat = F.log_softmax(logits / tau, dim=-1)
    log_y_tilde = target_log_probs(targets, embedding if target_grad else embedding.detach(), tau)
    return (log_y_tilde.exp() * (log_y_tilde - log_y_hat)).sum(dim=-1)


def target_log_probs(targets: Tensor, embedding: Tensor, tau: float) -> Tensor:
    """``log y_tilde: (N, V)``: ``log_softmax(embedding[targets] @ embedding.T / tau)`` (eqs. 3.6-3.7).

    ``targets: (N,)``, ``embedding: (V, E)``. Differentiable in ``embedding``; detach it for a
    constant target.
    """
    u = F.embedding(targets, embedding) / tau
    return F.log_softmax(u @ embedding.T, dim=-1)


class AugmentedLoss:
    """``alpha * mean_t KL(y_tilde_t || y_hat_t)`` with ``alpha = gamma * tau`` (eq. 3.3, appendix
    A), as an objective term: it reads the clean softmax logits the NLL was computed from (under
    AdvSoft too) and the input layer's embedding."""

    reads = frozenset({"logits", "targets", "input_weight"})

    def __init__(self, gamma: float, tau: float, target_grad: bool = False) -> None:
        self.weight, self.tau, self.target_grad = gamma * tau, tau, target_grad

    def __call__(self, inputs: TermInputs) -> Tensor:
        assert inputs.logits is not None
        embedding = inputs.model.embedding.tied_weight()
        return (
            self.weight
            * augmented_kl(inputs.logits, inputs.targets.reshape(-1), embedding, self.tau, self.target_grad).mean()
        )
