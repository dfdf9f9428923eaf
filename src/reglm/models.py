"""The language model: input layer -> encoder -> output layer (see DESIGN in the README).

* Input layer: word embedding ``(V, E)``, ``U(-init_range, init_range)`` (AWD-LSTM section 5),
  embedding dropout (section 4.3) and locked dropout on the embedded input (section 4.2).
* Encoder: :class:`~reglm.encoders.awd_lstm.AWDLSTMEncoder` (sections 2, 4.2, 4.5).
* Output layer: :class:`~reglm.outputs.softmax.SoftmaxOutput`, tied to the embedding when
  ``cfg.tie_weights`` (section 4.4).

The regularization terms (AR/TAR, :mod:`reglm.objectives.activation_reg`) read the
:class:`~reglm.encoders.awd_lstm.EncoderOutput` returned by :meth:`LanguageModel.forward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config import ModelConfig
from reglm.encoders.awd_lstm import AWDLSTMEncoder, EncoderOutput, LSTMState
from reglm.layers.dropout import LockedDropout, embedding_dropout
from reglm.outputs.softmax import SoftmaxOutput


class LanguageModel(nn.Module):
    """A word-level language model built from ``(cfg, vocab_size)``.

    With ``cfg.tie_weights`` the output layer's ``weight`` *is* ``embedding.weight`` (one
    Parameter registered under both names); ``safetensors.torch.save_model``/``load_model``
    store it once and load it in place, so tying survives a round trip.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, cfg.emb_size)
        nn.init.uniform_(self.embedding.weight, -cfg.init_range, cfg.init_range)
        self.input_dropout = LockedDropout(cfg.input_dropout)
        self.encoder = AWDLSTMEncoder(cfg)
        tied = self.embedding.weight if cfg.tie_weights else None
        self.output = SoftmaxOutput(self.encoder.output_size, vocab_size, tied)

    def embed(self, ids: Tensor) -> Tensor:
        """``ids: (B, T) -> (B, T, E)``: embedding lookup with embedding dropout, then locked dropout."""
        weight = embedding_dropout(self.embedding.weight, self.cfg.embed_dropout, self.training)
        return self.input_dropout(F.embedding(ids, weight))

    def forward(self, ids: Tensor, state: list[LSTMState] | None = None) -> EncoderOutput:
        """``ids: (B, T)``, ``state`` from :meth:`init_state` / a previous call, or None (zeros)."""
        return self.encoder(self.embed(ids), state)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> list[LSTMState]:
        """Zero recurrent state for ``batch_size`` streams: ``(h, c)`` per layer, each ``(1, B, H_l)``."""
        return self.encoder.init_state(batch_size, device)

    def nll(self, ids: Tensor, targets: Tensor, state: list[LSTMState] | None = None) -> tuple[Tensor, list[LSTMState]]:
        """``ids, targets: (B, T)`` -> (per-token NLL ``(B, T)``, new state)."""
        out = self(ids, state)
        return self.output.nll(out.output, targets), out.state

    def log_probs(self, ids: Tensor, state: list[LSTMState] | None = None) -> tuple[Tensor, list[LSTMState]]:
        """``ids: (B, T)`` -> (log-probabilities of the next word ``(B, T, V)``, new state)."""
        out = self(ids, state)
        return self.output.log_probs(out.output), out.state

    def num_parameters(self) -> int:
        """Number of parameter scalars; a tied matrix counts once."""
        return sum(p.numel() for p in self.parameters())
