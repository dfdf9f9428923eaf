"""The word-embedding input layer (AWD-LSTM sections 4.2, 4.3; Wang et al. 2019, section 5).

``ids: (B, T) -> (B, T, E)``: a lookup in the ``(V, E)`` embedding, with, in training only,

1. embedding dropout (whole word types dropped for the pass, :func:`~reglm.layers.dropout.embedding_dropout`),
2. Gaussian noise of the standard deviation the trainer's schedule gives (input noise),
3. locked dropout on the embedded words (one mask per sequence, :class:`~reglm.layers.dropout.LockedDropout`),

in that order (the order of the adversarial-softmax authors' code). The ``(V, E)`` matrix is what a
tied output layer shares (:meth:`WordEmbedding.tied_weight`); initialization ``U(-r, r)`` with
``r = init_range`` (AWD-LSTM section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, check_positive, check_prob, kind_field, option
from reglm.inputs.base import InputLayer
from reglm.layers.dropout import LockedDropout, embedding_dropout
from reglm.layers.inference import EmbeddingLookup, Frozen


@dataclass(frozen=True)
class EmbeddingConfig(ComponentConfig):
    """A word embedding with embedding dropout, input noise and locked dropout."""

    kind: str = kind_field(
        "embedding",
        "a word embedding",
    )
    emb_size: int = option(200, "word embedding size E (input and, when tied, output)", arch=True)
    embed_dropout: float = option(
        0.0, "embedding dropout: probability of dropping a whole word type per batch (AWD-LSTM 4.3)"
    )
    dropout: float = option(0.1, "locked dropout on the embedded words (AWD-LSTM 4.2; the old model.input_dropout)")
    init_range: float = option(0.1, "the embedding is initialized U(-init_range, init_range)")

    def __post_init__(self) -> None:
        check(self.emb_size >= 1, "model.input.emb_size", f"{self.emb_size} must be >= 1")
        check_prob(self.embed_dropout, "model.input.embed_dropout")
        check_prob(self.dropout, "model.input.dropout")
        check_positive(self.init_range, "model.input.init_range")

    @property
    def output_size(self) -> int:
        return self.emb_size

    def widths(self) -> dict[str, int]:
        return {"emb_size": self.emb_size}


class WordEmbedding(InputLayer):
    """The input layer; its parameter ``weight: (V, E)`` is the embedding (saved as ``embedding.weight``)."""

    Config = EmbeddingConfig
    capabilities = frozenset({"word-matrix"})

    def __init__(self, cfg: EmbeddingConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.output_size = cfg.emb_size
        self.weight = nn.Parameter(torch.empty(vocab_size, cfg.emb_size))
        # drawn as torch.nn.Embedding draws it (normal, then our uniform), so that a seed gives
        # the initial weights, and the random stream after them, of every earlier reglm version
        nn.init.normal_(self.weight)
        nn.init.uniform_(self.weight, -cfg.init_range, cfg.init_range)
        self.dropout = LockedDropout(cfg.dropout)
        self.sparse_gradient = False

    @classmethod
    def from_config(cls, cfg: EmbeddingConfig, vocab_size: int, vocab: object = None) -> WordEmbedding:
        return cls(cfg, vocab_size)

    def tied_weight(self) -> nn.Parameter:
        """The ``(V, E)`` matrix a tied output layer uses as its own."""
        return self.weight

    def gradient_mode(self) -> None:
        """Sparse lookup gradients in eval mode (dynamic evaluation's working copy): only the
        looked-up rows, never a dense ``(V, E)`` zero matrix; a tied output layer's dense gradient
        takes them as a row sum."""
        self.sparse_gradient = True

    def forward(self, ids: Tensor, noise_std: float = 0.0) -> Tensor:
        """``ids: (B, T) -> (B, T, E)``; ``noise_std``: the training-only input noise."""
        if self.sparse_gradient and not self.training:
            return F.embedding(ids, self.weight, sparse=True)
        x = embedding_dropout(ids, self.weight, self.cfg.embed_dropout, self.training)
        if self.training and noise_std > 0:
            x = x + noise_std * torch.randn_like(x)
        return self.dropout(x)

    def export_module(self, frozen: Frozen) -> nn.Module:
        """The lookup in the trained matrix, shared with a softmax that ties to it."""
        return EmbeddingLookup(frozen.embedding(self.weight, share=True))
