"""Output layers: encoder output -> next-word distribution (:mod:`reglm.outputs.base`).

``OUTPUTS`` maps each ``model.output.kind`` to its class, an
:class:`~reglm.outputs.base.OutputLayer` with ``Config`` (its frozen config dataclass),
``capabilities``, and ``from_config(cfg, in_features, vocab_size, input_layer, encoder)``.
"""

from reglm.outputs.adaptive_softmax import AdaptiveSoftmax
from reglm.outputs.mixture import MixtureOfSoftmaxes
from reglm.outputs.softmax import SoftmaxOutput

OUTPUTS = {"softmax": SoftmaxOutput, "mos": MixtureOfSoftmaxes, "doc": MixtureOfSoftmaxes, "adaptive": AdaptiveSoftmax}

__all__ = ["OUTPUTS", "AdaptiveSoftmax", "MixtureOfSoftmaxes", "SoftmaxOutput"]
