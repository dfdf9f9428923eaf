"""The one parser of ``key=value`` text: run-config overrides (``train.lr=10``) and the specs of
command-line options (``--cache window=2000,theta=1.0``, ``--dynamic-search lr=1e-5,2e-5;...``).

Values are YAML scalars (``none``/``null`` is None; ``1e-9``-style numbers, which YAML 1.1 leaves
strings, are floats), typed by the dataclass field they set (:func:`~reglm.config.fields.coerce`).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from typing import Any

import yaml

from reglm.config.fields import coerce, fields_of, hints_of
from reglm.errors import ReglmError


def parse_value(text: str) -> Any:
    """A ``key=value`` value as YAML (``none``/``null`` -> None; ``1e-9``-style numbers, which
    YAML 1.1 leaves strings, -> float)."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and value.lower() in ("none", "null"):
        return None
    if isinstance(value, str) and any(c.isdigit() for c in value):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_assignments(
    items: Iterable[str], what: str = "override", example: str = "train.lr=10"
) -> list[tuple[str, Any]]:
    """``["train.lr=10", "emb_size=400"]`` -> ``[("train.lr", 10), ("emb_size", 400)]``."""
    out = []
    for item in items:
        if "=" not in item:
            raise ReglmError(f"{what} {item!r} is not key=value; write e.g. {example} (`reglm config` lists keys)")
        key, text = item.split("=", 1)
        out.append((key.strip(), parse_value(text)))
    return out


class SpecError(ReglmError):
    """A bad setting of an option's spec (``--cache window=0``); ``detail`` is the message
    without the option, so a parser can say which option it came from."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def spec_items(
    text: str, option: str, keys: dict[str, str], sep: str = ",", example: str = ""
) -> dict[str, tuple[str, str]]:
    """The ``key=value`` items of an option's spec, split on ``sep``: ``{field: (key as written,
    value text)}``. ``keys`` maps every accepted key (aliases included) to its field; a malformed
    item, an unknown key or a field given twice is a ReglmError naming ``option``."""
    items: dict[str, tuple[str, str]] = {}
    for item in text.split(sep):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or not key or not value:
            raise SpecError(
                f"{option}: {text!r} is malformed: expected key=value items separated by {sep!r}, got "
                f"{item.strip()!r} (e.g. {option} {example})"
            )
        if key not in keys:
            raise SpecError(f"{option}: unknown key {key!r}; valid keys: {', '.join(sorted(keys))}")
        if keys[key] in items:
            raise SpecError(f"{option}: {text!r} gives {key} twice")
        items[keys[key]] = (key, value)
    return items


def spec_value(cls: type, name: str, key: str, text: str, option: str) -> Any:
    """``text`` as the value of field ``name`` of the spec dataclass ``cls`` (a YAML scalar
    coerced to the field's type; a word in the field's ``metadata["none"]`` reads as None)."""
    f = fields_of(cls)[name]
    if text.lower() in f.metadata.get("none", ()):
        return None
    try:
        return coerce(parse_value(text), hints_of(cls)[name], key)
    except ReglmError:
        kind = {int: "a whole number", float: "a number"}.get(_scalar(hints_of(cls)[name]), "valid")
        raise SpecError(f"{option}: {key}={text!r} is not {kind}") from None


def _scalar(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def under_option(option: str, build_spec: Any) -> Any:
    """``build_spec()``, its :class:`SpecError` re-raised with ``option`` in front."""
    try:
        return build_spec()
    except SpecError as exc:
        if exc.detail.startswith(f"{option}:"):
            raise
        raise SpecError(f"{option}: {exc.detail}") from None
