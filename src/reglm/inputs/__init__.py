"""Input layers: token ids -> vectors. ``INPUTS`` maps each ``model.input.kind`` to its layer, an
:class:`~reglm.inputs.base.InputLayer`."""

from reglm.inputs.adaptive_input import AdaptiveInput
from reglm.inputs.char_cnn import CharCNN
from reglm.inputs.embedding import WordEmbedding

INPUTS = {"embedding": WordEmbedding, "adaptive": AdaptiveInput, "char-cnn": CharCNN}

__all__ = ["INPUTS", "AdaptiveInput", "WordEmbedding"]
