"""What every model component (input layer, encoder, output layer) declares beyond its own
computation, with the defaults a component that lacks the part gets.

Nothing outside a component discovers these with ``hasattr``: the base classes
(:class:`~reglm.inputs.base.InputLayer`, :class:`~reglm.encoders.base.Encoder`,
:class:`~reglm.outputs.base.OutputLayer`) derive from :class:`Component`, the registries accept
only their subclasses (:func:`register`), and a component overrides what it
has:

* ``skips_parameters``: some of its parameters may get no gradient in a training step (an
  adaptive layer's band or cluster that no token of the batch reaches); data-parallel training
  then asks ``DistributedDataParallel`` to look for unused parameters. Every other component
  uses every parameter in every step (the registry conformance suite checks it);
* ``gradient_mode()``: what it switches so that dynamic evaluation's working copy, in eval mode,
  can be differentiated (cuDNN's LSTM backpropagates only in training mode); nothing by default;
* ``export_module(frozen)``: its inference path (:mod:`reglm.layers.inference`); by default it
  has none and raises :class:`~reglm.layers.inference.NotExportable`, which ``reglm export``
  turns into an error naming the component's option.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

from torch import nn

from reglm.config.fields import ComponentConfig
from reglm.config.kinds import registry
from reglm.layers.inference import Frozen, NotExportable


class Component(nn.Module):
    """The declared optional parts of a model component (module docstring)."""

    role: ClassVar[str] = "component"
    """What the component is, in messages ("output layer")."""
    skips_parameters: ClassVar[bool] = False

    def gradient_mode(self) -> None:
        """Make this component differentiable in eval mode (dynamic evaluation); nothing to do."""

    def export_module(self, frozen: Frozen) -> Any:
        """The export-ready module (:mod:`reglm.layers.inference`); by default there is none."""
        raise NotExportable(f"the {self.role} {type(self).__name__} has no inference module")


BASES: dict[str, tuple[str, str]] = {
    "input": ("reglm.inputs.base", "InputLayer"),
    "encoder": ("reglm.encoders.base", "Encoder"),
    "output": ("reglm.outputs.base", "OutputLayer"),
}
"""Model component family -> (module, base class): what a registered component derives from."""


def register(family: str, kind: str) -> Any:
    """A class decorator adding a component to ``family``'s registry
    (:data:`~reglm.config.kinds.FAMILIES`) as ``kind``: ``@register("encoder", "my-rnn")``. A
    model component must derive from its family's base (:data:`BASES`) and its ``Config`` from
    :class:`ComponentConfig`; every ``Config`` is a dataclass with a ``kind`` field."""

    def add(cls: type) -> type:
        if family in BASES:
            base = getattr(importlib.import_module(BASES[family][0]), BASES[family][1])
            config = getattr(cls, "Config", None)
            if not (issubclass(cls, base) and isinstance(config, type) and issubclass(config, ComponentConfig)):
                raise TypeError(f"a {family} must derive from {base.__name__} and its Config from ComponentConfig")
        if not (dataclasses.is_dataclass(cls.Config) and "kind" in {f.name for f in dataclasses.fields(cls.Config)}):
            raise TypeError(f"{cls.__name__}.Config must be a dataclass with a kind field")
        registry(family)[kind] = cls
        return cls

    return add
