"""The settings of dynamic evaluation (:mod:`reglm.evaluate.dynamic`): one spec, a search grid,
and their ``--dynamic`` / ``--dynamic-search`` texts, parsed by the one key=value parser
(:mod:`reglm.config.parse`). Defaults are the reference code's."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from torch import Tensor

from reglm.config.parse import SpecError, spec_items, spec_value, under_option

OPTION = "--dynamic"
SEARCH_OPTION = "--dynamic-search"
VARIANTS = ("rms", "sgd")
ADAPTS = ("all", "output")
DEFAULT_RMS_LR = 5e-5
LR_FACTORS = (0.6, 0.8, 1.0, 1.2, 1.4, 2.0)
LAMBDA_FACTORS = (0.5, 1.0, 1.5, 2.5)


@dataclass(frozen=True)
class DynamicSpec:
    """Settings of one dynamic evaluation; defaults are the reference's (see the module doc).
    Validated on construction: a bad value raises :class:`~reglm.config.parse.SpecError`."""

    lr: float | None = None
    """learning rate eta; None: 5e-5 for ``rms`` (reference default); required for ``sgd``"""
    lam: float = 0.002
    """decay lambda toward the trained weights, in [0, 1] (the spec key is ``lambda``)"""
    eps: float = 2e-5
    """stabilizer epsilon added to the gradient RMS, > 0 (``rms`` only)"""
    segment: int = 5
    """tokens per stream between two updates (the reference's ``--bptt``)"""
    variant: str = "rms"
    """``rms``: RMS-normalized step with RMS-scaled decay; ``sgd``: plain step, uniform decay"""
    max_train_tokens: int | None = field(default=None, metadata={"none": ("all", "none")})
    """cap on the training targets read for the statistics; None (``all``): the whole training split"""
    batch_size: int = 1
    """streams scored side by side while evaluating (the reference uses 1)"""
    stats_batch_size: int = 100
    """streams per batch of the statistics pass (the reference's ``--batch_size``)"""
    adapt: str = "all"
    """``all`` parameters (the paper), or only the ``output`` layer's (with a tied embedding):
    the encoder then runs without gradients, several times cheaper per segment"""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise SpecError(f"variant={self.variant!r} is unknown; choose {' or '.join(VARIANTS)}")
        if self.adapt not in ADAPTS:
            raise SpecError(f"adapt={self.adapt!r} is unknown; choose {' or '.join(ADAPTS)}")
        if self.lr is None:
            if self.variant == "sgd":
                raise SpecError(
                    "variant=sgd has no default learning rate (the reference tunes only the rms rule); give "
                    "lr=..., e.g. found with --dynamic-search"
                )
            object.__setattr__(self, "lr", DEFAULT_RMS_LR)
        for key, value in (("lr", self.lr), ("lambda", self.lam), ("eps", self.eps)):
            if not math.isfinite(value):
                raise SpecError(f"{key}={value} must be a finite number")
        if self.lr < 0:
            raise SpecError(f"lr={self.lr} must be >= 0")
        if not 0.0 <= self.lam <= 1.0:
            raise SpecError(
                f"lambda={self.lam} must be in [0, 1] (1 pulls the weights all the way back to the trained ones at "
                "every update)"
            )
        if self.eps <= 0:
            raise SpecError(f"eps={self.eps} must be > 0")
        for key in ("segment", "batch_size", "stats_batch_size"):
            if getattr(self, key) < 1:
                raise SpecError(f"{key}={getattr(self, key)} must be >= 1")
        if self.max_train_tokens is not None and self.max_train_tokens < 1:
            raise SpecError(f"max_train_tokens={self.max_train_tokens} must be >= 1 (or all)")

    def as_dict(self) -> dict[str, float | int | str | None]:
        """The settings under the keys :func:`parse_dynamic_spec` reads."""
        return {
            "lr": self.lr,
            "lambda": self.lam,
            "eps": self.eps,
            "segment": self.segment,
            "variant": self.variant,
            "max_train_tokens": self.max_train_tokens,
            "batch_size": self.batch_size,
            "stats_batch_size": self.stats_batch_size,
            "adapt": self.adapt,
        }


@dataclass(frozen=True)
class DynamicGrid:
    """What :func:`dynamic_search` tries: ``spec`` with every ``(lr, lam)`` of ``lrs x lams``.
    Validated on construction like :class:`DynamicSpec`."""

    spec: DynamicSpec
    lrs: tuple[float, ...]
    lams: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.lrs or not self.lams:
            raise SpecError(
                f"the search grid needs at least one lr and one lambda (got {len(self.lrs)} and {len(self.lams)})"
            )
        self.specs()

    @classmethod
    def around(cls, spec: DynamicSpec) -> DynamicGrid:
        """The default grid: ``lr x (0.6, 0.8, 1, 1.2, 1.4, 2)`` and ``lam x (0.5, 1, 1.5, 2.5)``
        (clipped to 1) around ``spec`` -- the reference's ``--grid`` for the default spec."""
        lams = tuple(dict.fromkeys(min(1.0, spec.lam * f) for f in LAMBDA_FACTORS))
        return cls(spec, tuple(spec.lr * f for f in LR_FACTORS), lams)

    def specs(self) -> list[DynamicSpec]:
        """Every grid point, lambda outer and lr inner (the reference's order)."""
        return [dataclasses.replace(self.spec, lr=lr, lam=lam) for lam in self.lams for lr in self.lrs]

    def __len__(self) -> int:
        return len(self.lrs) * len(self.lams)

    def as_dict(self) -> dict:
        return {**self.spec.as_dict(), "lr": list(self.lrs), "lambda": list(self.lams)}


KEYS = {
    "lr": "lr",
    "lambda": "lam",
    "lam": "lam",
    "eps": "eps",
    "epsilon": "eps",
    "segment": "segment",
    "variant": "variant",
    "max_train_tokens": "max_train_tokens",
    "batch_size": "batch_size",
    "stats_batch_size": "stats_batch_size",
    "adapt": "adapt",
}
"""spec key (aliases included) -> :class:`DynamicSpec` field"""


def parse_dynamic_spec(text: str, option: str = OPTION) -> DynamicSpec:
    """``"lr=5e-5,lambda=0.002,eps=2e-5,segment=5,variant=rms,max_train_tokens=200000"`` ->
    :class:`DynamicSpec`. Keys in any order, each at most once; a missing key takes its default
    and an empty text gives all defaults. Keys: ``lr``, ``lambda`` (or ``lam``), ``eps`` (or
    ``epsilon``), ``segment``, ``variant`` (``rms`` | ``sgd``), ``max_train_tokens`` (a number or
    ``all``), ``batch_size``, ``stats_batch_size``, ``adapt`` (``all`` | ``output``). Raises
    :class:`ReglmError` naming ``option`` and the offending item."""

    def build() -> DynamicSpec:
        values = {}
        if text.strip():
            for name, (key, value) in spec_items(text, option, KEYS, ",", "lr=5e-5,lambda=0.002,segment=5").items():
                values[name] = spec_value(DynamicSpec, name, key, value, option)
        return DynamicSpec(**values)

    return under_option(option, build)


def parse_dynamic_grid(text: str, option: str = SEARCH_OPTION) -> DynamicGrid:
    """``"lr=3e-5,5e-5,1e-4;lambda=0.001,0.002;segment=5"`` -> :class:`DynamicGrid`: groups
    separated by ``;``; ``lr`` and ``lambda`` take comma-separated values (repeats count once),
    every other :func:`parse_dynamic_spec` key one value, fixed for the whole search. A missing
    ``lr`` or ``lambda`` takes the :meth:`DynamicGrid.around` values of the fixed settings (the
    reference's grid for ``""``). Raises :class:`ReglmError` naming ``option``."""

    def build() -> DynamicGrid:
        fixed: dict = {}
        lists: dict[str, tuple[float, ...]] = {}
        if text.strip():
            for name, (key, value) in spec_items(text, option, KEYS, ";", "lr=3e-5,5e-5;lambda=0.001,0.002").items():
                parts = [part.strip() for part in value.split(",")]
                if name in ("lr", "lam"):
                    lists[name] = tuple(
                        dict.fromkeys(spec_value(DynamicSpec, name, key, part, option) for part in parts)
                    )
                elif len(parts) > 1:
                    raise SpecError(f"{key}={value!r}: only lr and lambda take several values")
                else:
                    fixed[name] = spec_value(DynamicSpec, name, key, value, option)
        spec = DynamicSpec(**fixed, **{name: values[0] for name, values in lists.items()})
        default = DynamicGrid.around(spec)
        return DynamicGrid(spec, lists.get("lr", default.lrs), lists.get("lam", default.lams))

    return under_option(option, build)


def check_training_data(
    train_ids: Tensor | None, spec: DynamicSpec, bptt: int | None = None, option: str = OPTION
) -> None:
    """Raise :class:`ReglmError` naming ``option`` when the ``rms`` rule cannot get its gradient
    statistics: no training split (``None`` or empty), or one too short for
    ``spec.stats_batch_size`` streams of at least ``bptt + 2`` tokens (default
    ``spec.segment``). The ``sgd`` rule needs no training data and always passes."""
    if spec.variant != "sgd":
        train_split_error(train_ids, spec, bptt, option)


def train_split_error(train_ids: Tensor | None, spec: DynamicSpec, bptt: int | None, option: str) -> None:
    if train_ids is None or train_ids.numel() == 0:
        raise SpecError(
            f"{option}: variant=rms needs gradient statistics from the training split, but no training data is "
            "available; point "
            "--data/--data-dir at the corpus the run was trained on (with its train.txt), or use variant=sgd with "
            "lr=..."
        )
    window = bptt or spec.segment
    need = spec.stats_batch_size * (window + 2)
    if train_ids.numel() < need:
        raise SpecError(
            f"{option}: the training split has {train_ids.numel()} tokens, too few for "
            f"stats_batch_size={spec.stats_batch_size} "
            f"streams of {window + 2} tokens ({need}); lower stats_batch_size"
        )
