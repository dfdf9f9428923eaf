"""Component families and their kinds: which registry holds a family's components, each kind's
config dataclass, the kinds as help texts and errors list them, and the one check that a config
builds the component its ``kind`` names.

A component family (``model.encoder``, ``train.optimizer``...) is a registry mapping each kind to
a component class whose ``Config`` is the kind's dataclass (:data:`FAMILIES`); a registry's
module is imported when the family is first read, not by this module.
"""

from __future__ import annotations

import importlib
from typing import Any

from reglm.config.fields import fields_of
from reglm.errors import ReglmError

FAMILIES: dict[str, tuple[str, str]] = {
    "input": ("reglm.inputs", "INPUTS"),
    "encoder": ("reglm.encoders", "ENCODERS"),
    "output": ("reglm.outputs", "OUTPUTS"),
    "optimizer": ("reglm.optim.optimizers", "OPTIMIZERS"),
    "averaging": ("reglm.optim.optimizers", "AVERAGING"),
    "schedule": ("reglm.optim.schedules", "SCHEDULES"),
    "batching": ("reglm.data.batchings", "BATCHINGS"),
    "objective": ("reglm.objectives.objective", "OBJECTIVES"),
}
"""Component family -> (module, registry): the registry maps each kind to a component class
whose ``Config`` is the kind's dataclass."""


def registry(family: str) -> dict[str, Any]:
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def family_configs(family: str) -> dict[str, type]:
    """kind -> config dataclass of a component family."""
    return {kind: component.Config for kind, component in registry(family).items()}


def kinds_help(family: str, described: bool = False) -> str:
    """The registered kinds of ``family`` as help texts and errors list them, read from its
    registry when they are printed, so a newly registered kind is listed with no other edit:
    ``"awd-lstm, vd-lstm, qrnn, transformer"``; ``described``: each with the help of its
    config's ``kind`` field, the kinds sharing a config together
    (``"softmax (a softmax over the vocabulary), mos or doc (...), ..."``)."""
    if not described:
        return ", ".join(registry(family))
    groups: dict[type, list[str]] = {}
    for kind, config in family_configs(family).items():
        groups.setdefault(config, []).append(kind)
    parts = []
    for config, kinds in groups.items():
        about = fields_of(config)["kind"].metadata.get("help")
        parts.append(f"{' or '.join(kinds)} ({about})" if about else " or ".join(kinds))
    return ", ".join(parts)


def component_class(family: str, config: Any, where: str = "") -> type:
    """The registered component that ``config`` builds: the one its ``kind`` names, which must be
    the component whose ``Config`` it is. The one check that a config's kind agrees with its
    class (the registry picks the class by kind; a config cannot name another kind's component)."""
    component = registry(family).get(config.kind)
    if component is None or type(config) is not component.Config:
        owners = [kind for kind, cls in family_configs(family).items() if cls is type(config)]
        raise ReglmError(
            f"invalid option {where or family}.kind: {type(config).__name__} is the config of "
            f"{' or '.join(owners) or 'no registered ' + family}, not of {config.kind!r}; "
            f"choose one of {kinds_help(family)}"
        )
    return component
