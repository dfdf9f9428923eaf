"""The subspace distance of Inan, Khosravi & Socher (2017), appendix B, and its use on a language model.

For ``X: (n, c1)`` and ``Y: (n, c2)``:

1. orthonormal bases ``U`` of ``span(X)`` and ``V`` of ``span(Y)`` (QR, float64);
2. the residual of projecting ``V`` onto ``span(U)``: ``R = V - U U^T V``;
3. ``d^2 = ||R||_F^2 / C = 1 - ||U^T V||_F^2 / C`` with ``C`` the number of columns of ``V``
   (eq. B.1). With ``rho_i = cos(theta_i)`` the singular values of ``U^T V`` (the cosines of the
   principal angles, Bjorck & Golub 1973), ``d^2 = (1/C) sum_i (1 - rho_i^2)`` -- the mean of
   ``sin^2 theta_i``, counting each direction of ``span(Y)`` that has no partner in ``span(X)`` as
   orthogonal. ``d`` is in ``[0, 1]``: 0 when ``span(Y)`` lies in ``span(X)`` (the same span when
   the dimensions agree), 1 when the spans are orthogonal. It is symmetric when both spans have
   the same dimension; otherwise ``C`` is the dimension of ``span(Y)`` and the order matters.

   For two *random* ``c``-dimensional subspaces of ``R^n`` the expected ``||U^T V||_F^2`` is
   ``c^2 / n``, so ``d ~ sqrt(1 - c / n)``: 0.985 for ``c = 300``, ``n = 10000`` (the paper's
   "almost 1" without the augmented loss).

Rank deficiency: the basis must span exactly the column space, and QR alone does not reveal the
rank. So each matrix is factored ``X = Q R`` (reduced QR, float64) and the singular values of the
small ``R`` (those of ``X``) give its numerical rank ``r``: singular values above
``max(n, c) * eps64 * sigma_max`` (``numpy.linalg.matrix_rank``'s default tolerance). At full rank
the basis is ``Q``; otherwise it is ``Q P_r`` with ``P_r`` the leading ``r`` left singular vectors of
``R``, i.e. the left singular vectors of ``X`` for its ``r`` significant singular values -- an
orthonormal basis of the numerical column space, at the cost of a ``c x c`` SVD. ``C`` is then the
rank of ``Y``. An all-zero matrix spans nothing and is an error.

:func:`embedding_subspace_distance` applies it to a :class:`~reglm.models.LanguageModel`: the span
of the input embedding ``L^T = embedding.weight: (V, E)`` against that of the output projection
``W = output.weight: (V, H)`` -- the quantity of section 6.2 / Figure 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from reglm.errors import ReglmError


def orthonormal_basis(x: Tensor) -> Tensor:
    """``x: (n, c)`` -> ``(n, r)`` float64 with orthonormal columns spanning the numerical column space of ``x``.

    ``r`` is the numerical rank (module docstring): the QR factor ``Q`` at full rank, else the
    left singular vectors of ``x`` for its ``r`` significant singular values (computed from the
    QR factor ``R``). ``r <= min(n, c)``: a matrix with more columns than rows spans at most
    ``R^n``. Raises ValueError for a matrix that is not 2-D, is empty, holds NaN/inf, or is all
    zeros.
    """
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"expected a non-empty (n, c) matrix, got shape {tuple(x.shape)}")
    n, c = x.shape
    a = x.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ValueError("the matrix holds NaN or infinite entries")
    q, r = torch.linalg.qr(a, mode="reduced")
    p, s, _ = torch.linalg.svd(r)
    if float(s[0]) == 0.0:
        raise ValueError("the matrix is all zeros: it spans no subspace")
    rank = int((s > max(n, c) * torch.finfo(torch.float64).eps * s[0]).sum())
    if rank == c:
        return q
    return q @ p[:, :rank]


def subspace_distance(x: Tensor, y: Tensor) -> float:
    """Distance between ``span(x)`` and ``span(y)`` (appendix B, eq. B.1), in ``[0, 1]``.

    ``x: (n, c1)``, ``y: (n, c2)`` (any dtype/device; computed in float64). With ``U``, ``V`` the
    orthonormal bases of :func:`orthonormal_basis`, ``d^2 = 1 - ||U^T V||_F^2 / C`` and ``C`` the
    number of columns of ``V`` (the rank of ``y``). Invariant to a change of basis of either
    argument (``x -> x A``, ``A`` invertible); symmetric when the ranks are equal.

    Raises ValueError when the row counts differ or either matrix is not a valid basis source
    (see :func:`orthonormal_basis`).
    """
    if x.dim() != 2 or y.dim() != 2 or x.size(0) != y.size(0):
        raise ValueError(
            f"expected (n, c1) and (n, c2) matrices with the same n, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    u = orthonormal_basis(x)
    v = orthonormal_basis(y).to(u.device)
    overlap = float((u.T @ v).pow(2).sum()) / v.size(1)
    return math.sqrt(min(1.0, max(0.0, 1.0 - overlap)))


def embedding_subspace_distance(model: nn.Module) -> float:
    """Subspace distance between the input embedding ``L^T`` and the output projection ``W`` of a language model.

    ``model``: a :class:`~reglm.models.LanguageModel` with a plain softmax output layer;
    ``subspace_distance(model.embedding.weight, model.output.weight)``, i.e. ``span(L^T)`` (the
    rows of ``L``, ``(V, E)``) against ``span(W)`` (``(V, H)``), as in section 6.2. A tied model
    gives 0.

    Raises :class:`ReglmError` when the output layer is not a plain softmax with one ``weight``
    of shape ``(V, *)``: a mixture of softmaxes (``model.output=mos`` or ``doc``) mixes several
    softmaxes of projected latent vectors, so its log-probabilities are not ``W h + b`` for one
    projection ``W`` and section 4's argument has no ``W`` to compare.
    """
    output = getattr(model, "output", None)
    embedding = getattr(model, "embedding", None)
    if embedding is None or not isinstance(getattr(embedding, "weight", None), Tensor):
        kind = type(embedding).__name__ if embedding is not None else "none"
        raise ReglmError(
            f"the subspace distance needs an input layer with one (V, E) embedding matrix, the model has {kind}; "
            "train the model with model.input=embedding and model.output=softmax"
        )
    vocab_size = embedding.weight.size(0)
    if "softmax-logits" not in getattr(output, "capabilities", ()):
        kind = type(output).__name__
        hint = (
            " (a mixture of softmaxes has no single output projection W with logits W h + b)"
            if "Mixture" in kind
            else ""
        )
        raise ReglmError(
            f"the subspace distance between L^T and W needs a plain softmax output layer, the model has {kind}{hint}; "
            "train the model with model.output=softmax"
        )
    weight = output.weight
    if weight.dim() != 2 or weight.size(0) != vocab_size:
        raise ReglmError(
            f"the output weight has shape {tuple(weight.shape)}, expected ({vocab_size}, H); the model is not a "
            "reglm LanguageModel"
        )
    return subspace_distance(embedding.weight, weight)
