"""Optimizers and averaging policies, as components of the trainer (``train.optimizer``,
``train.averaging``): which update rule steps the weights, and whether (and when) the iterates
are averaged. The choice of one is independent of the other.

* ``train.optimizer=sgd``: SGD with L2 weight decay (the learning rate per step comes from the
  schedule, :mod:`reglm.optim.schedules`);
* ``train.optimizer=nesterov``: SGD with Nesterov momentum (Sutskever et al. 2013; Baevski &
  Auli's 0.99, section 4.5), PyTorch's formulation ``v <- mu v + g``, ``p <- p - lr (g + mu v)``;
  the authors' code rescales the momentum buffer when the rate changes (lr_t / lr_{t-1}), which
  this one does not;
* ``train.optimizer=adam``: Adam (Kingma & Ba 2015), the fused kernel where PyTorch has one.
* ``train.averaging=ntasgd``: NT-ASGD's non-monotone trigger starts averaging in the main stage
  (AWD-LSTM section 3, Algorithm 1; :mod:`reglm.optim.ntasgd`); ``none``: never average.

An averaging policy declares whether it runs the fine-tuning stage (``finetunes``: ASGD restarted
with T = 0 from the best model, stopped by the policy's own criterion, through ``begin_finetune``
and ``finetune_epoch_end``); ``train.finetune.enabled`` needs one that does. Its config says how
its options counting epochs shrink with a shorter run (``fewer_epochs(factor)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from reglm.config.fields import check, check_kind, check_nonneg, check_positive, divided, kind_field, option
from reglm.optim.ntasgd import TRIGGER_VARIANTS, NonMonotoneTrigger, ParameterAverager


@dataclass(frozen=True)
class SGDConfig:
    """Stochastic gradient descent."""

    kind: str = kind_field("sgd", "SGD with L2 weight decay")
    lr: float = option(20.0, "learning rate (per step rescaled by the schedule, e.g. by seq_len / bptt)")
    weight_decay: float = option(1.2e-6, "L2 weight decay")

    def __post_init__(self) -> None:
        check_positive(self.lr, "train.optimizer.lr")
        check_nonneg(self.weight_decay, "train.optimizer.weight_decay")


class SGD:
    Config = SGDConfig

    @staticmethod
    def build(cfg: SGDConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class NesterovConfig:
    """SGD with Nesterov momentum."""

    kind: str = kind_field("nesterov", "SGD with Nesterov momentum")
    lr: float = option(1.0, "the maximum learning rate (the schedule scales it per step)")
    momentum: float = option(0.99, "Nesterov momentum mu (Baevski & Auli: 0.99)")
    weight_decay: float = option(0.0, "L2 weight decay")

    def __post_init__(self) -> None:
        check_positive(self.lr, "train.optimizer.lr")
        check(0.0 < self.momentum < 1.0, "train.optimizer.momentum", f"{self.momentum} must be in (0, 1)")
        check_nonneg(self.weight_decay, "train.optimizer.weight_decay")


class Nesterov:
    Config = NesterovConfig

    @staticmethod
    def build(cfg: NesterovConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class AdamConfig:
    """Adam."""

    kind: str = kind_field("adam", "Adam, Kingma & Ba 2015")
    lr: float = option(1e-3, "learning rate (the schedule scales it per step)")
    beta1: float = option(0.9, "decay of the first-moment estimate")
    beta2: float = option(0.999, "decay of the second-moment estimate")
    eps: float = option(1e-8, "added to the root of the second moment")
    weight_decay: float = option(0.0, "L2 weight decay (added to the gradient, not decoupled)")

    def __post_init__(self) -> None:
        check_positive(self.lr, "train.optimizer.lr")
        for name in ("beta1", "beta2"):
            check(
                0.0 <= getattr(self, name) < 1.0, f"train.optimizer.{name}", f"{getattr(self, name)} must be in [0, 1)"
            )
        check_positive(self.eps, "train.optimizer.eps")
        check_nonneg(self.weight_decay, "train.optimizer.weight_decay")


class Adam:
    Config = AdamConfig

    @staticmethod
    def build(cfg: AdamConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        params = list(params)
        fused = bool(params) and params[0].device.type in ("cpu", "cuda")
        return torch.optim.Adam(
            params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
        )


OPTIMIZERS = {"sgd": SGD, "nesterov": Nesterov, "adam": Adam}


@dataclass(frozen=True)
class NoAveragingConfig:
    """No averaging: the iterate is the model."""

    kind: str = kind_field("none", "never average")

    def fewer_epochs(self, factor: int) -> dict[str, Any]:
        """Nothing counts epochs."""
        return {}


@dataclass(frozen=True)
class NTASGDConfig:
    """Non-monotonically triggered averaging (AWD-LSTM section 3)."""

    kind: str = kind_field("ntasgd", "average once the non-monotone trigger fires, AWD-LSTM")
    trigger: str = option(
        "reference",
        "the non-monotone trigger: reference (worse than the best older than n logs) or paper (Algorithm 1)",
    )
    nonmono: int = option(5, "non-monotone interval n (in epochs); the fine-tuning stage stops on the same criterion")

    def __post_init__(self) -> None:
        check_kind(self.trigger, TRIGGER_VARIANTS, "train.averaging.trigger")
        check(self.nonmono >= 1, "train.averaging.nonmono", f"{self.nonmono} must be >= 1")

    def fewer_epochs(self, factor: int) -> dict[str, Any]:
        """The non-monotone interval, for a run ``factor`` times shorter (``reglm reproduce --scale reduced``)."""
        return {"nonmono": divided(self.nonmono, factor, 1)}


class NoAveraging:
    """Never averages; the iterate is what evaluation sees."""

    Config = NoAveragingConfig
    active = False
    finetunes = False

    def __init__(self, cfg: NoAveragingConfig) -> None:
        self.cfg = cfg

    def update(self, params: Iterable[torch.Tensor]) -> None:
        """Nothing to fold in."""

    def main_epoch_end(self, valid: float, params: Iterable[torch.Tensor]) -> bool:
        """Whether averaging starts now: never."""
        return False

    def averaged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        raise RuntimeError("no averaging")

    def state_dict(self) -> dict[str, Any]:
        return {"averager": ParameterAverager().state_dict(), "trigger": {"log": []}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


class NTASGD:
    """NT-ASGD (AWD-LSTM Algorithm 1): the trigger decides when the main stage starts averaging;
    the fine-tuning stage (ASGD restarted with T = 0) averages from its start and stops on the
    same criterion. The average is separate state (:class:`~reglm.optim.ntasgd.ParameterAverager`)."""

    Config = NTASGDConfig
    finetunes = True

    def __init__(self, cfg: NTASGDConfig) -> None:
        self.cfg = cfg
        self.trigger = NonMonotoneTrigger(cfg.nonmono, cfg.trigger)
        self.averager = ParameterAverager()

    @property
    def active(self) -> bool:
        return self.averager.active

    def update(self, params: Iterable[torch.Tensor]) -> None:
        """Fold in the iterate after an optimizer step, once averaging runs."""
        if self.averager.active:
            self.averager.update(params)

    def main_epoch_end(self, valid: float, params: Iterable[torch.Tensor]) -> bool:
        """Log the epoch's validation score; whether averaging starts now (at these weights)."""
        if self.averager.active or not self.trigger.update(valid):
            return False
        self.averager.start(params)
        return True

    def begin_finetune(self, params: Iterable[torch.Tensor]) -> None:
        """ASGD with T = 0: a fresh trigger, averaging from the current weights."""
        self.trigger = NonMonotoneTrigger(self.cfg.nonmono, self.cfg.trigger)
        self.averager.start(params)

    def finetune_epoch_end(self, valid: float) -> bool:
        """Whether the fine-tuning stage stops: the non-monotone criterion fired."""
        return self.trigger.update(valid)

    def averaged_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.averager.averaged_state(model)

    def state_dict(self) -> dict[str, Any]:
        return {"averager": self.averager.state_dict(), "trigger": self.trigger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averager.load_state_dict(state["averager"])
        self.trigger.load_state_dict(state["trigger"])


AVERAGING = {"none": NoAveraging, "ntasgd": NTASGD}
