"""Schedules of the trainer; none of them knows a model.

* the learning rate per step (``train.schedule``: :class:`DecaySchedule`, :class:`CosineSchedule`);
* the adversarial softmax on/off (:func:`advsoft_on`) and the input-noise std (:func:`annealed_std`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from reglm.config.fields import check, divided, kind_field, option
from reglm.optim.ntasgd import NonMonotoneTrigger


def advsoft_on(enabled: bool, stop_epoch: int | None, in_finetune: bool, stage: str, epoch: int) -> bool:
    """Whether a step of (0-based) ``epoch`` of ``stage`` trains with the adversarial softmax:
    on from the start when configured, off after ``train.advsoft_stop_epoch`` main-stage epochs,
    and in fine-tuning per ``train.finetune.advsoft``."""
    if not enabled:
        return False
    if stage == "finetune":
        return in_finetune
    return stop_epoch is None or epoch < stop_epoch


def annealed_std(std: float, schedule: str, epoch: int, length: float) -> float:
    """The input-noise std of a main-stage epoch (0-based ``epoch``), Wang et al. 2019 section 5.

    The paper only says "small annealed Gaussian noise"; the schedule is ours to choose:

    * ``constant``: ``std`` every epoch (the authors' code, which then uses no noise in
      fine-tuning -- the trainer's ``finetune_input_noise_std``);
    * ``linear``: ``std * max(0, 1 - epoch / length)``, zero from epoch ``length`` on;
    * ``exponential``: ``std * 0.5 ** (epoch / length)``, halving every ``length`` epochs.
    """
    if schedule == "constant":
        return std
    if schedule == "linear":
        return std * max(0.0, 1.0 - epoch / length)
    if schedule == "exponential":
        return std * 0.5 ** (epoch / length)
    raise ValueError(f"unknown noise schedule {schedule!r}")


@dataclass(frozen=True)
class DecayScheduleConfig:
    """The learning rate of a main-stage epoch: ``lr * decay ** min(max(0, e - decay_start),
    decay_epochs)`` times the plateau factor accumulated so far; fine-tuning runs at
    ``train.finetune.lr``."""

    kind: str = kind_field("decay", "per-epoch decay and plateau drops")
    decay: float = option(
        1.0,
        "multiply the rate by this every epoch after decay_start (Zaremba et al.; Inan et al. appendix A: 0.9 / "
        "0.97); 1: no decay",
    )
    decay_start: int = option(
        0, "main-stage epoch after which the decay applies: epoch e runs at lr * decay ** max(0, e - decay_start)"
    )
    decay_epochs: int | None = option(
        None,
        "apply the decay for this many epochs after decay_start, then hold the rate (decay=0.1 decay_start=12 "
        "decay_epochs=1: divide by 10 once, after epoch 12, the AWD-LSTM code's --when 12); none: every epoch",
    )
    plateau_factor: float | None = option(
        None,
        "multiply the rate by this whenever an epoch does not improve the best validation score (Popov & Kudinov's "
        "synthetic study: 0.1); none: off",
    )
    nonmono_factor: float | None = option(
        None,
        "multiply the rate by this whenever NT-ASGD's non-monotone criterion (reference variant, interval "
        "nonmono_interval) fires on the validation score, instead of starting to average (AWD-LSTM Table 4 '- "
        "NT-ASGD': 0.5); none: off",
    )
    nonmono_interval: int = option(5, "the non-monotone interval n (in epochs) of nonmono_factor's criterion")
    plateau_stop: float | None = option(
        None,
        "end the main stage once the plateau and non-monotone drops have multiplied the rate by this or less "
        "(plateau_factor=0.1 plateau_stop=0.001: stop at the third drop instead of training on at lr / 1000); "
        "none: train.epochs alone ends it",
    )

    def __post_init__(self) -> None:
        stop = self.plateau_stop
        check(
            stop is None or (math.isfinite(stop) and 0 < stop < 1),
            "train.schedule.plateau_stop",
            f"{stop} must be in (0, 1) or none",
        )
        check(
            self.nonmono_factor is None or (math.isfinite(self.nonmono_factor) and 0 < self.nonmono_factor < 1),
            "train.schedule.nonmono_factor",
            f"{self.nonmono_factor} must be in (0, 1) or none",
        )
        check(self.nonmono_interval >= 1, "train.schedule.nonmono_interval", f"{self.nonmono_interval} must be >= 1")
        check(
            math.isfinite(self.decay) and 0 < self.decay <= 1, "train.schedule.decay", f"{self.decay} must be in (0, 1]"
        )
        check(self.decay_start >= 0, "train.schedule.decay_start", f"{self.decay_start} must be >= 0")
        check(
            self.decay_epochs is None or self.decay_epochs >= 1,
            "train.schedule.decay_epochs",
            f"{self.decay_epochs} must be >= 1 or none",
        )
        check(
            self.plateau_factor is None or (math.isfinite(self.plateau_factor) and 0 < self.plateau_factor < 1),
            "train.schedule.plateau_factor",
            f"{self.plateau_factor} must be in (0, 1) or none",
        )

    def fewer_epochs(self, factor: int) -> dict[str, Any]:
        """The options that count epochs, for a run ``factor`` times shorter (``reglm reproduce
        --scale reduced``): the decay starts and the non-monotone interval spans ``factor`` times
        fewer epochs, and one epoch decays the rate as ``factor`` did; with ``decay_epochs``, the
        decay spans ``factor`` times fewer epochs (at least one) and divides the rate as much in
        all (``decay ** decay_epochs``)."""
        out = {
            "decay_start": divided(self.decay_start, factor),
            "decay": self.decay**factor,
            "nonmono_interval": divided(self.nonmono_interval, factor, 1),
        }
        if self.decay_epochs is not None:
            out["decay_epochs"] = divided(self.decay_epochs, factor, 1)
            out["decay"] = self.decay ** (self.decay_epochs / out["decay_epochs"])
        return out


class DecaySchedule:
    """``train.schedule=decay``: see :class:`DecayScheduleConfig`. Step-based in form (the trainer
    asks for every step's rate), epoch-based in value; its state is the scale the plateau and
    non-monotone drops accumulated, and the validation log of the non-monotone criterion.

    The non-monotone drop (``nonmono_factor``) is AWD-LSTM Table 4's "- NT-ASGD": "SGD with
    learning rate reduced by 2 using the same nonmonotonic fashion". The criterion is
    :class:`~reglm.optim.ntasgd.NonMonotoneTrigger`'s reference variant over every epoch's
    validation score, and it is never reset: as in the reference code, where
    ``optimizer.param_groups[0]['lr'] /= 2.`` stands (commented out) at the point where SGD
    switches to ASGD, the rate halves at every epoch the criterion holds, and stops halving once
    a new best score is more than ``nonmono_interval`` epochs old."""

    Config = DecayScheduleConfig

    def __init__(self, cfg: DecayScheduleConfig, lr: float, finetune_lr: float | None) -> None:
        self.cfg, self.lr, self.finetune_lr = cfg, lr, finetune_lr
        self.scale = 1.0
        self.trigger = NonMonotoneTrigger(cfg.nonmono_interval)

    def rate(self, stage: str, epoch: int, step: int) -> float:
        """The rate of a step of (0-based) ``epoch`` of ``stage``, before any per-batch rescaling."""
        if stage == "finetune":
            return (self.finetune_lr if self.finetune_lr is not None else self.lr) * self.scale
        decays = max(0, epoch + 1 - self.cfg.decay_start)
        if self.cfg.decay_epochs is not None:
            decays = min(decays, self.cfg.decay_epochs)
        return self.lr * self.cfg.decay**decays * self.scale

    def epoch_end(self, improved: bool, valid: float | None = None) -> bool:
        """After an epoch's validation (``valid``: its score, which the non-monotone criterion
        logs): whether the rate dropped (a plateau or the non-monotone criterion)."""
        factor = 1.0
        if not improved and self.cfg.plateau_factor is not None:
            factor *= self.cfg.plateau_factor
        if self.cfg.nonmono_factor is not None and valid is not None and self.trigger.update(valid):
            factor *= self.cfg.nonmono_factor
        self.scale *= factor
        return factor != 1.0

    def exhausted(self, stage: str) -> bool:
        """Whether the drops have taken the main stage's rate to ``plateau_stop`` (a relative
        tolerance of 1e-9 absorbs rounding: 0.1 ** 3 is 0.0010000000000000002); the scale is in
        the checkpoint, so a resumed run decides as the uninterrupted one did."""
        stop = self.cfg.plateau_stop
        return stage == "main" and stop is not None and self.scale <= stop * (1 + 1e-9)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "nonmono": self.trigger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scale = state.get("scale") if isinstance(state, dict) else None
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError("expected a positive finite scale")
        self.scale = float(scale)
        self.trigger.load_state_dict(state.get("nonmono", {"log": []}))


@dataclass(frozen=True)
class CosineScheduleConfig:
    """Linear warm-up, then cosine cycles (SGDR, Loshchilov & Hutter 2016; Baevski & Auli section 4.5)."""

    kind: str = kind_field("cosine", "warm-up, then cosine cycles")
    warmup_steps: int = option(16000, "steps of linear warm-up from warmup_init_lr to the optimizer's lr (the maximum)")
    warmup_init_lr: float = option(1e-7, "the rate at step 0 of the warm-up")
    min_lr: float = option(1e-5, "the minimum of the first cycle")
    period: int = option(18000, "steps of the first cycle (WikiText-103: 18K; billion word: 137K)")
    t_mult: float = option(2.0, "each cycle runs this many times as long as the one before")
    shrink: float = option(
        0.75,
        "the maximum and minimum rates of each cycle are those of the one before times this (M: 0.75 WikiText-103, "
        "0.6 billion word)",
    )

    def __post_init__(self) -> None:
        check(self.warmup_steps >= 0, "train.schedule.warmup_steps", f"{self.warmup_steps} must be >= 0")
        check(self.period >= 1, "train.schedule.period", f"{self.period} must be >= 1")
        check(math.isfinite(self.t_mult) and self.t_mult >= 1, "train.schedule.t_mult", f"{self.t_mult} must be >= 1")
        check(
            math.isfinite(self.shrink) and 0 < self.shrink <= 1,
            "train.schedule.shrink",
            f"{self.shrink} must be in (0, 1]",
        )
        for name in ("warmup_init_lr", "min_lr"):
            check(
                math.isfinite(getattr(self, name)) and getattr(self, name) >= 0,
                f"train.schedule.{name}",
                f"{getattr(self, name)} must be >= 0",
            )

    def fewer_epochs(self, factor: int) -> dict[str, Any]:
        """Nothing: the warm-up and the cycles count steps, not epochs."""
        return {}


class CosineSchedule:
    """``train.schedule=cosine``: a pure function of the step (:class:`CosineScheduleConfig`)::

        step < W:  lr_0 + (lr_max - lr_0) * step / W
        else:      t = step - W in cycle i (lengths P, P m, P m^2, ...), at t_i steps into it:
                   lr = min_i + (max_i - min_i) * (1 + cos(pi t_i / P_i)) / 2,
                   max_i = lr_max M^i, min_i = lr_min M^i, P_i = P m^i

    The fine-tuning stage, if any, runs at ``train.finetune.lr`` (or the minimum rate)."""

    Config = CosineScheduleConfig

    def __init__(self, cfg: CosineScheduleConfig, lr: float, finetune_lr: float | None) -> None:
        self.cfg, self.lr, self.finetune_lr = cfg, lr, finetune_lr

    def rate(self, stage: str, epoch: int, step: int) -> float:
        cfg = self.cfg
        if stage == "finetune":
            return self.finetune_lr if self.finetune_lr is not None else cfg.min_lr
        if step < cfg.warmup_steps:
            return cfg.warmup_init_lr + (self.lr - cfg.warmup_init_lr) * step / cfg.warmup_steps
        t, cycle, period = step - cfg.warmup_steps, 0, float(cfg.period)
        while t >= period:
            t -= period
            period *= cfg.t_mult
            cycle += 1
        scale = cfg.shrink**cycle
        low, high = cfg.min_lr * scale, self.lr * scale
        return low + (high - low) * (1 + math.cos(math.pi * t / period)) / 2

    def epoch_end(self, improved: bool, valid: float | None = None) -> bool:
        """A step-based schedule ignores validation."""
        return False

    def exhausted(self, stage: str) -> bool:
        """Only ``train.epochs`` or ``train.max_steps`` end a cosine schedule's main stage."""
        return False

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Nothing to restore: the rate is a function of the step."""


SCHEDULES = {"decay": DecaySchedule, "cosine": CosineSchedule}
