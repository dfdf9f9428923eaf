"""What ``reglm config`` prints: every option of every kind with its help, or a built
configuration's values as overrides that set them."""

from __future__ import annotations

import dataclasses
from typing import Any

from reglm.config.build import Path, all_paths, nested_assignments


def describe(root: type) -> str:
    """One line per option of every kind: key, type, default, the kinds that have it, help."""
    lines = []
    defaults = root()
    for path, f, hint, kinds, text in all_paths(root):
        if path[-1] == "kind" and not kinds:
            continue
        default = _default_of(defaults, path, None if f.default is dataclasses.MISSING else f.default)
        type_name = str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
        key = ".".join(path)
        scope = f" [{', '.join(kinds)}]" if kinds else ""
        lines.append(f"{key:34s} {type_name:12s} {default!r:12s} {text}{scope}")
    return "\n".join(lines)


def describe_values(config: Any) -> str:
    """One ``key=value`` line per option of a built config, kinds first, each written as an
    override that sets it (``none``, ``true``/``false``), so a line can be pasted back."""

    def text(value: Any) -> str:
        if value is None or isinstance(value, bool):
            return {None: "none", True: "true", False: "false"}[value]
        return str(value)

    return "\n".join(f"{key}={text(value)}" for key, value in nested_assignments(dataclasses.asdict(config)))


def _default_of(defaults: Any, path: Path, fallback: Any) -> Any:
    """The value at ``path`` of the default config (the default kind's), else ``fallback`` (an
    option only other kinds have: their default)."""
    value = defaults
    for name in path:
        if not hasattr(value, name):
            return fallback
        value = getattr(value, name)
    return value
