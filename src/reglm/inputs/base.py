"""The base every input layer derives from: token ids -> vectors.

An input layer has ``Config`` (its :class:`~reglm.config.fields.ComponentConfig` dataclass),
``from_config(cfg, vocab_size, vocab)``, ``output_size`` (``E``),
``forward(ids: (B, T), noise_std=0.0) -> (B, T, E)`` (``noise_std``: the training-only input
noise) and ``export_module(frozen)`` (``tokens -> (B, T, E)``, :mod:`reglm.layers.inference`).
The optional parts of every component are declared in :class:`~reglm.layers.component.Component`;
those only an input layer has are its ``capabilities``:

* ``"word-matrix"``: :meth:`InputLayer.tied_weight` returns the ``(V, E)`` word matrix that a
  tied output layer uses as its own and the augmented loss reads;
* ``"bands"``: :meth:`InputLayer.band_weights` returns an adaptive input's per-band
  ``(embedding, projection)`` pairs, which an adaptive softmax ties to.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from reglm.layers.component import Component


class InputLayer(Component):
    """Base of the input layers; see the module docstring."""

    role = "input layer"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    output_size: int

    def forward(self, ids: Tensor, noise_std: float = 0.0) -> Tensor:
        raise NotImplementedError

    def tied_weight(self) -> nn.Parameter:
        """The ``(V, E)`` word matrix (capability ``"word-matrix"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no word matrix")

    def band_weights(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """Per band ``(embedding, projection)`` (capability ``"bands"``)."""
        raise NotImplementedError(f"{type(self).__name__} has no bands")
