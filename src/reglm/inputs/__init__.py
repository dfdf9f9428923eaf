"""Input layers: token ids -> vectors. ``INPUTS`` maps each ``model.input.kind`` to its layer."""

from reglm.inputs.embedding import WordEmbedding

INPUTS = {"embedding": WordEmbedding}

__all__ = ["INPUTS", "WordEmbedding"]
