"""The pieces every configuration dataclass is made of: a documented field, its fields and resolved
annotations as the builder reads them, range checks, a value as its option's scalar type, and the
did-you-mean of error messages.

Light on purpose (no PyTorch): component modules define their own frozen config dataclass next
to the component, with :func:`option` fields, and validate it in ``__post_init__`` with these
checks, which raise :class:`~reglm.errors.ReglmError` naming the option.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Iterable
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
      its dataclass), ``None`` for every other component;
    * ``widths()``: the options that are the component's widths, which ``reglm reproduce --scale
      reduced`` divides; by default ``None``, widths that cannot be divided."""

    advsoft = None

    def check_with(self, model: Any) -> None:
        """A ReglmError naming the option when this component does not fit ``model``'s others."""

    def widths(self) -> dict[str, int] | None:
        """The options that are this component's widths, by name, with their values (an option
        left ``None`` is none of them); ``None``: the component cannot be made narrower by
        dividing options (the reduced scale then refuses the model)."""
        return None


def divided(value: float, factor: float, least: int = 0) -> int:
    """``value / factor`` rounded half up, at least ``least``: a count (of epochs, of units) at
    a ``factor`` times smaller scale."""
    return max(least, math.floor(value / factor + 0.5))


def kind_field(kind: str, help: str) -> Any:
    """The ``kind`` field of a component config: which registered component it builds; ``help``
    says what this kind is (``reglm config`` lists every registered kind of the family with it).
    That the kind is one of its class's is checked once, where the registry picks the class
    (:func:`~reglm.config.kinds.component_class`)."""
    return field(default=kind, metadata={"help": help, "kind": True})


@functools.cache
def hints_of(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config dataclass (cached: resolving them is slow; read only)."""
    return typing.get_type_hints(cls)


def fields_of(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


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


SIMILAR = 0.75
"""How alike (difflib's ratio) a mistyped name and a known one must be to be suggested."""


def closest(word: Any, choices: Iterable[str]) -> str | None:
    """The one of ``choices`` closest to a mistyped ``word``, or None when none is close."""
    close = difflib.get_close_matches(str(word), sorted(set(choices)), n=1, cutoff=SIMILAR)
    return close[0] if close else None


def did_you_mean(word: Any, choices: Iterable[str]) -> str:
    """``" (did you mean X?)"`` for the one of ``choices`` closest to a mistyped ``word``; empty
    when none is close."""
    return suggestion(closest(word, choices))


def suggestion(*names: str | None) -> str:
    return f" (did you mean {' or '.join(n for n in names if n)}?)" if any(names) else ""


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as the scalar type ``tp`` (int, float, bool, str or an optional of one)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ReglmError:
                continue
        raise ReglmError(f"{where}: {value!r} is not a valid {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ReglmError(f"{where}: {value!r} is not true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ReglmError(f"{where}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ReglmError(f"{where}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ReglmError(f"{where}: {value!r} is not a string")
    raise TypeError(f"unsupported config type {tp}")
