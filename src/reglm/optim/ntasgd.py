"""NT-ASGD (AWD-LSTM section 3, Algorithm 1) as two independent pieces.

- :class:`NonMonotoneTrigger` decides *when*: it logs one validation value per logging
  interval (an epoch in the paper) and reports when training stopped improving. The main stage
  starts averaging the first time it fires; the fine-tuning stage (section 5, "ASGD with T=0")
  stops the first time it fires ("the same non-monotonic criterion").
- :class:`ParameterAverager` does the *averaging*: plain SGD keeps stepping the weights while
  the averager accumulates ``1/(K-T+1) * sum_{i=T..K} w_i`` as separate tensors. The weights
  of the training model are never swapped or modified; evaluation uses a copy loaded from the
  average (:meth:`ParameterAverager.load_into`, :meth:`ParameterAverager.averaged_state`).

Both have ``state_dict()``/``load_state_dict()`` made of ints, floats, lists and tensors only,
so they round-trip through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from reglm.errors import ReglmError

TRIGGER_VARIANTS = ("reference", "paper")


class NonMonotoneTrigger:
    """The non-monotone criterion of NT-ASGD over a log of validation values (lower is better).

    With ``l_0 .. l_{t-1}`` the ``t`` values logged so far and ``v`` the new value,
    :meth:`update` evaluates the condition *before* appending ``v`` (Algorithm 1, lines 5-9):

    - ``variant="reference"`` (default), the official AWD-LSTM code
      (``len(logs) > n and v > min(logs[:-n])``)::

          t > n  and  v > min(l_0, ..., l_{t-n-1})

      ``v`` is worse than the best value logged more than ``n`` logs ago: after the best value
      so far, training gets ``n`` more logs to beat it. This is the rule behind the paper's
      published numbers.

    - ``variant="paper"``, Algorithm 1 as printed (its window ``{t-n, ..., t}`` names index ``t``,
      which is not logged yet when the test runs, so it is the last ``n`` logged values)::

          t > n  and  v > min(l_{t-n}, ..., l_{t-1})

      ``v`` is not better than the best of the last ``n`` values: it fires on the first log
      (after the first ``n``) that fails to improve on the recent window, so much earlier.

    Comparisons are strict: a value equal to the minimum does not fire, and a NaN never fires.
    """

    def __init__(self, n: int, variant: str = "reference") -> None:
        if variant not in TRIGGER_VARIANTS:
            raise ReglmError(f"unknown NT-ASGD trigger {variant!r}; choose one of {', '.join(TRIGGER_VARIANTS)}")
        if n < 1:
            raise ReglmError(f"the non-monotone interval n must be >= 1, got {n}")
        self.n = n
        self.variant = variant
        self._log: list[float] = []

    @property
    def log(self) -> tuple[float, ...]:
        """The values logged so far, oldest first."""
        return tuple(self._log)

    def update(self, v: float) -> bool:
        """Whether the criterion holds for ``v`` given the earlier values; then log ``v``."""
        t = len(self._log)
        if t > self.n:
            window = self._log[: t - self.n] if self.variant == "reference" else self._log[t - self.n :]
            fires = v > min(window)
        else:
            fires = False
        self._log.append(float(v))
        return fires

    def state_dict(self) -> dict[str, Any]:
        """``{"log": [floats]}``; ``n`` and the variant come from the configuration."""
        return {"log": list(self._log)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        log = state.get("log") if isinstance(state, dict) else None
        if not isinstance(log, list) or not all(isinstance(x, (int, float)) for x in log):
            raise ReglmError(
                "the NT-ASGD trigger state is damaged (expected a list of validation values); start a new run"
            )
        self._log = [float(x) for x in log]


class ParameterAverager:
    """Running average of a list of parameters, kept as separate tensors (the "A" of ASGD).

    ``params`` is always ``model.parameters()`` of the training model (or the same list):
    that iterator yields a tied parameter once, so it is averaged once, and it yields the
    parameters in registration order, which is how :meth:`averaged_state` and
    :meth:`load_into` pair averages with parameters, also in another instance of the same model.

    :meth:`start` begins at the current iterate ``w_T`` (the average then equals the weights);
    :meth:`update` after each later optimizer step folds in the new iterate:
    ``avg += (w - avg) / (count + 1)``, so after ``K - T`` updates the average is
    ``1/(K-T+1) * sum_{i=T..K} w_i`` (Algorithm 1's return value).

    Precision: the average is kept in ``dtype``, float64 by default. A float32 running mean
    makes one float32 rounding error per step, and they add up: over 10^5 iterates of weights
    ``1 +- 0.01`` it drifts up to 2e-5 from the exact mean, about 100 times what one late
    iterate contributes (``0.01 / 10^5``), so late iterates are effectively lost; float64 stays
    within 1e-13. It costs twice the memory of float32 weights; ``dtype=torch.float32``
    halves that where memory is tight.
    """

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self._avg: list[torch.Tensor] = []
        self._count = 0

    @property
    def active(self) -> bool:
        """Whether averaging has started."""
        return self._count > 0

    @property
    def count(self) -> int:
        """How many iterates are in the average (0 before :meth:`start`)."""
        return self._count

    @torch.no_grad()
    def start(self, params: Iterable[torch.Tensor]) -> None:
        """Start (or restart) averaging at the current iterate: the average becomes a copy of ``params``."""
        self._avg = [p.detach().to(self.dtype, copy=True) for p in params]
        self._count = 1

    @torch.no_grad()
    def update(self, params: Iterable[torch.Tensor]) -> None:
        """Fold in the iterate after an optimizer step: ``avg += (w - avg) / (count + 1)``."""
        if not self.active:
            raise RuntimeError("ParameterAverager.update() before start()")
        params = list(params)
        self._check(params)
        weight = 1.0 / (self._count + 1)
        for i, p in enumerate(params):
            avg = self._avg[i] = self._avg[i].to(p.device)
            avg.lerp_(p.detach().to(self.dtype), weight)
        self._count += 1

    def averaged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A copy of ``model.state_dict()`` with every averaged parameter replaced by its average.

        Each average is cast to the dtype and device of its parameter; every name of a tied
        parameter maps to the one averaged tensor. Buffers are copied. ``model`` is not modified.
        """
        if not self.active:
            raise RuntimeError("ParameterAverager.averaged_state() before start()")
        unique = list(model.parameters())
        self._check(unique)
        index = {id(p): i for i, p in enumerate(unique)}
        averaged = [avg.to(device=p.device, dtype=p.dtype, copy=True) for avg, p in zip(self._avg, unique)]
        state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        for name, p in model.named_parameters(remove_duplicate=False):
            state[name] = averaged[index[id(p)]]
        return state

    @torch.no_grad()
    def load_into(self, model: nn.Module) -> None:
        """Copy the average into the parameters of ``model`` in place (its buffers are left alone).

        ``model`` is meant to be a separate evaluation instance of the training model's
        architecture; never pass the training model itself.
        """
        if not self.active:
            raise RuntimeError("ParameterAverager.load_into() before start()")
        params = list(model.parameters())
        self._check(params)
        for p, avg in zip(params, self._avg):
            p.copy_(avg)

    def state_dict(self) -> dict[str, Any]:
        """``{"count": int, "avg": [tensors]}`` (an empty list before :meth:`start`)."""
        return {"count": self._count, "avg": list(self._avg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the averages move to the parameters' device at the next update."""
        count = state.get("count") if isinstance(state, dict) else None
        avg = state.get("avg") if isinstance(state, dict) else None
        if (
            not isinstance(count, int)
            or not isinstance(avg, list)
            or not all(isinstance(a, torch.Tensor) for a in avg)
            or count < 0
            or (count == 0) != (len(avg) == 0)
        ):
            raise ReglmError(
                "the parameter-averaging state is damaged (expected a count and a list of tensors); start a new run"
            )
        self._avg = [a.to(self.dtype) for a in avg]
        self._count = count

    def _check(self, params: list[torch.Tensor]) -> None:
        if len(params) != len(self._avg) or any(p.shape != a.shape for p, a in zip(params, self._avg)):
            raise ValueError(
                f"parameters do not match the averaged ones ({len(params)} tensors vs {len(self._avg)}); "
                "pass model.parameters() of the same architecture"
            )
