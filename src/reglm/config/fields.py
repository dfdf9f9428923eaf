"""The pieces every configuration dataclass is made of: a documented field and range checks.

Light on purpose (no PyTorch): component modules define their own frozen config dataclass next
to the component, with :func:`option` fields, and validate it in ``__post_init__`` with these
checks, which raise :class:`~reglm.errors.ReglmError` naming the option.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

from reglm.errors import ReglmError

MAX_SEED = 2**63 - 1


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with a one-line ``help`` (what ``reglm config`` prints)."""
    if isinstance(default, (dict, list)) or hasattr(default, "__dataclass_fields__"):
        return field(default_factory=lambda: default, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


class ComponentConfig:
    """The base of the config dataclass of every input layer, encoder and output layer: the
    optional parts of a model component's config, declared with their defaults.

    * ``check_with(model_config)``: does this component fit the other two (sizes to tie, layers
      to read); called by ``ModelConfig``; by default it fits;
    * ``advsoft``: the adversarial-softmax config of an output layer that offers it (a field of
      its dataclass), ``None`` for every other component."""

    advsoft = None

    def check_with(self, model: Any) -> None:
        """A ReglmError naming the option when this component does not fit ``model``'s others."""


def kind_field(kind: str, help: str) -> Any:
    """The ``kind`` field of a component config: which registered component it builds; ``help``
    says what this kind is (``reglm config`` lists every registered kind of the family with it).
    That the kind is one of its class's is checked once, where the registry picks the class
    (:func:`~reglm.config.build.component_class`)."""
    return field(default=kind, metadata={"help": help, "kind": True})


def check(cond: bool, option_name: str, message: str) -> None:
    if not cond:
        raise ReglmError(f"invalid option {option_name}: {message}")


def check_prob(value: float, option_name: str) -> None:
    check(math.isfinite(value) and 0.0 <= value < 1.0, option_name, f"{value} must be in [0, 1)")


def check_nonneg(value: float, option_name: str) -> None:
    check(math.isfinite(value) and value >= 0, option_name, f"{value} must be finite and >= 0")


def check_positive(value: float, option_name: str) -> None:
    check(math.isfinite(value) and value > 0, option_name, f"{value} must be finite and > 0")


def check_seed(value: int, option_name: str) -> None:
    check(0 <= value <= MAX_SEED, option_name, f"{value} must be in [0, 2^63 - 1]")


def check_kind(value: str, kinds: tuple[str, ...], option_name: str) -> None:
    check(value in kinds, option_name, f"unknown {value!r}; choose {' or '.join(kinds)}")
