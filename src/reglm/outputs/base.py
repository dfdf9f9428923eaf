"""The one interface every output layer implements, over the whole encoder output.

An output layer reads an :class:`~reglm.encoders.base.EncoderOutput` (its ``output``, and any
other field it needs: DOC's experts read ``layer_outputs``) and offers

* ``score(out, targets, adversarial=False, keep_logits=False) -> OutputLoss``: the training
  loss -- per-token NLL under the adversarial softmax when ``adversarial``, the layer's own
  penalty term, and, with ``keep_logits``, the clean softmax logits ``(N, V)`` for objective
  terms that read them (the augmented loss);
* ``predict(out) -> (B, T, V)``: next-word log-probabilities (clean);
* ``full_logits(out) -> (B, T, V)``: logits whose softmax is the prediction, or a mixture's
  unnormalized log-mixture (what a discriminator reads through a sigmoid).

* ``export_module(frozen) -> nn.Module``: its inference path for ``reglm export``
  (:mod:`reglm.layers.inference`), ``forward(h: (B, T, H), layers: List[Tensor]) -> (B, T, V)``
  log-probabilities; a layer that does not define one is refused by the exporter (the default
  of :class:`~reglm.layers.component.Component`, with ``skips_parameters`` and ``gradient_mode``).

Capabilities a layer may lack are declared, never discovered by ``isinstance``:
``"logits"`` (:meth:`full_logits`), ``"softmax-logits"`` (``keep_logits``: logits whose softmax is
the prediction, which a temperature can divide), ``"advsoft"`` (``adversarial=True``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from reglm.encoders.base import EncoderOutput
from reglm.errors import ReglmError
from reglm.layers.component import Component


@dataclass
class OutputLoss:
    """``nll: (B, T)`` per-token NLL; ``penalty: ()`` the layer's own objective term, coefficient
    included (0 when it has none); ``logits: (N, V)`` the clean logits when they were asked for."""

    nll: Tensor
    penalty: Tensor
    logits: Tensor | None = None


class OutputLayer(Component, ABC):
    """Base of the output layers; see the module docstring."""

    role = "output layer"
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def score(
        self, out: EncoderOutput, targets: Tensor, adversarial: bool = False, keep_logits: bool = False
    ) -> OutputLoss:
        """The training loss of ``targets: (B, T)``."""

    @abstractmethod
    def predict(self, out: EncoderOutput) -> Tensor:
        """Next-word log-probabilities ``(B, T, V)``."""

    @abstractmethod
    def full_logits(self, out: EncoderOutput) -> Tensor:
        """Logits ``(B, T, V)`` (capability ``"logits"``)."""

    def nll(self, out: EncoderOutput, targets: Tensor) -> Tensor:
        """The clean per-token NLL ``(B, T)``."""
        return self.score(out, targets).nll


def require(layer: type[OutputLayer] | OutputLayer, capability: str, option: str, why: str) -> None:
    """A ReglmError naming ``option`` when the output layer lacks ``capability``."""
    if capability not in layer.capabilities:
        name = layer.__name__ if isinstance(layer, type) else type(layer).__name__
        raise ReglmError(
            f"invalid option {option}: {why}, which the output layer {name} does not offer ({capability}); choose "
            "another output layer or turn the option off"
        )
