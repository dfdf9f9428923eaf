"""The language model: input layer -> encoder -> output layer (see DESIGN in the README).

* Input layer: word embedding ``(V, E)``, ``U(-init_range, init_range)`` (AWD-LSTM section 5),
  embedding dropout (section 4.3) and locked dropout on the embedded input (section 4.2).
* Encoder (``cfg.encoder``): :class:`~reglm.encoders.awd_lstm.AWDLSTMEncoder` (sections 2, 4.2,
  4.5) or the VD-LSTM baseline of Inan et al. (2017) :class:`~reglm.encoders.vd_lstm.VDLSTMEncoder`.
* Output layer (``cfg.output``): :class:`~reglm.outputs.softmax.SoftmaxOutput` or the mixture of
  softmaxes :class:`~reglm.outputs.mixture.MixtureOfSoftmaxes` (``mos``; ``doc`` adds experts
  from the intermediate layers named by ``cfg.doc_experts``), tied to the embedding when
  ``cfg.tie_weights`` (section 4.4), with the adversarial softmax of Wang et al. (2019) when
  ``cfg.advsoft`` is set (:mod:`reglm.outputs.adversarial`). Tied with ``cfg.output_bias`` false
  it is Inan et al.'s reused embeddings (RE): ``W = L^T`` and ``b = 0``.

Training-only input noise (Wang et al. 2019, section 5) is added to the embedded words after
embedding dropout and before locked dropout, the order of the authors' code; the trainer
passes its standard deviation to :meth:`LanguageModel.forward` per its schedule.

The regularization terms (AR/TAR, :mod:`reglm.objectives.activation_reg`) read the
:class:`~reglm.encoders.base.EncoderOutput` returned by :meth:`LanguageModel.forward`; the
output layer's own objective term (DOC's penalty on the mixture weights) comes with the NLL from
:meth:`LanguageModel.output_loss`, so the mixture is computed once; so does Inan et al.'s
augmented loss, which reads the same logits as the NLL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config import ModelConfig
from reglm.encoders.awd_lstm import AWDLSTMEncoder
from reglm.encoders.base import EncoderOutput, State
from reglm.errors import ReglmError
from reglm.encoders.vd_lstm import VDLSTMEncoder
from reglm.layers.dropout import LockedDropout, embedding_dropout
from reglm.objectives.augmented_loss import augmented_kl
from reglm.outputs.adversarial import AdvSoft
from reglm.outputs.mixture import MixtureOfSoftmaxes, mixture_weight_penalty
from reglm.outputs.softmax import SoftmaxOutput


def advsoft_from_config(cfg: ModelConfig, output_layer: type) -> AdvSoft | None:
    """The :class:`AdvSoft` settings of ``cfg``, or None when ``cfg.advsoft`` is None.

    Raises :class:`ReglmError` when the output layer class cannot perturb its target logits.
    """
    if cfg.advsoft is None:
        return None
    if not getattr(output_layer, "supports_advsoft", False):
        raise ReglmError(f"model.advsoft={cfg.advsoft} is not supported by the output layer {output_layer.__name__}; set model.advsoft=none")
    return AdvSoft(mode=cfg.advsoft, alpha=cfg.advsoft_alpha, epsilon=cfg.advsoft_epsilon, grad=cfg.advsoft_grad, positive_only=cfg.advsoft_positive_only)


@dataclass
class OutputLoss:
    """What the output layer contributes to the training objective.

    * ``nll: (B, T)`` -- per-token negative log-likelihood;
    * ``penalty: ()`` -- the output layer's own regularization term, coefficient included:
      ``model.mixture_penalty * mixture_weight_penalty(pi)`` for a mixture (DOC), plus the
      augmented loss ``alpha * mean KL(y_tilde || y_hat)`` when asked for; else 0.
    """

    nll: Tensor
    penalty: Tensor


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
        self.encoder: AWDLSTMEncoder | VDLSTMEncoder
        if cfg.encoder == "vd-lstm":
            self.encoder = VDLSTMEncoder(cfg.emb_size, cfg.hidden_size, cfg.num_layers, cfg.hidden_dropout, cfg.init_range)
        else:
            self.encoder = AWDLSTMEncoder(cfg)
        tied = self.embedding.weight if cfg.tie_weights else None
        doc_counts = cfg.doc_expert_counts()
        self.doc_layers = [l for l, k in enumerate(doc_counts) if k > 0]
        self.output: SoftmaxOutput | MixtureOfSoftmaxes
        if cfg.output == "softmax":
            self.output = SoftmaxOutput(
                self.encoder.output_size, vocab_size, tied, advsoft_from_config(cfg, SoftmaxOutput), bias=cfg.output_bias, init_range=cfg.init_range,
            )
        else:
            extra = [(self.encoder.layers[l].hidden_size, doc_counts[l]) for l in self.doc_layers]
            self.output = MixtureOfSoftmaxes(
                self.encoder.output_size, cfg.emb_size, vocab_size, cfg.n_experts, cfg.latent_dropout, tied,
                advsoft_from_config(cfg, MixtureOfSoftmaxes), extra,
            )

    def embed(self, ids: Tensor, noise_std: float = 0.0) -> Tensor:
        """``ids: (B, T) -> (B, T, E)``: embedding lookup with embedding dropout, Gaussian noise of
        std ``noise_std`` (training mode only), then locked dropout."""
        weight = embedding_dropout(self.embedding.weight, self.cfg.embed_dropout, self.training)
        x = F.embedding(ids, weight)
        if self.training and noise_std > 0:
            x = x + noise_std * torch.randn_like(x)
        return self.input_dropout(x)

    def forward(self, ids: Tensor, state: State | None = None, input_noise: float = 0.0) -> EncoderOutput:
        """``ids: (B, T)``, ``state`` from :meth:`init_state` / a previous call, or None (zeros);
        ``input_noise``: std of the training-only Gaussian noise on the embedded input."""
        return self.encoder(self.embed(ids, input_noise), state)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State | None:
        """The encoder's zero state for ``batch_size`` streams (None for a stateless encoder)."""
        return self.encoder.init_state(batch_size, device)

    def output_loss(
        self, out: EncoderOutput, targets: Tensor, adversarial: bool = False, aug_weight: float = 0.0, aug_tau: float = 20.0, aug_target_grad: bool = False,
    ) -> OutputLoss:
        """The output layer on an encoder output: ``targets: (B, T)`` -> :class:`OutputLoss` (per-token
        NLL and the layer's penalty), under the adversarial softmax when ``adversarial``. The
        training loop adds ``penalty`` to its loss; DOC's experts read ``out.layer_outputs`` here.

        ``aug_weight > 0`` adds Inan et al.'s augmented loss ``aug_weight * mean_t KL(y_tilde_t ||
        y_hat_t)`` (eqs. 3.1-3.3, :func:`~reglm.objectives.augmented_loss.augmented_kl`) on the
        clean logits of the softmax output layer, with temperature ``aug_tau``.
        """
        if isinstance(self.output, SoftmaxOutput):
            flat_h = out.output.reshape(-1, self.output.in_features)
            logits = self.output.logits(flat_h)
            penalty = out.output.new_zeros(())
            if aug_weight > 0:
                penalty = aug_weight * augmented_kl(logits, targets.reshape(-1), self.embedding.weight, aug_tau, aug_target_grad).mean()
                if adversarial:
                    logits = logits.clone()
            return OutputLoss(self.output.nll_from_logits(logits, flat_h, targets, adversarial), penalty)
        if aug_weight > 0:
            raise ValueError("the augmented loss needs a softmax output layer")
        score = self.output.score(out.output, targets, adversarial, self._doc_inputs(out))
        lam = self.cfg.mixture_penalty
        return OutputLoss(score.nll, lam * mixture_weight_penalty(score.weights) if lam > 0 else score.nll.new_zeros(()))

    def output_nll(self, out: EncoderOutput, targets: Tensor, adversarial: bool = False) -> Tensor:
        """The per-token NLL ``(B, T)`` of :meth:`output_loss`, without the penalty. Every caller
        scores through this method, :meth:`output_loss` and :meth:`output_log_probs`, so an output
        layer that reads more of the encoder output than its last layer plugs in here."""
        if isinstance(self.output, SoftmaxOutput):
            return self.output.nll(out.output, targets, adversarial=adversarial)
        return self.output.nll(out.output, targets, adversarial, self._doc_inputs(out))

    def output_logits(self, out: EncoderOutput) -> Tensor:
        """The output layer's logits ``(B, T, V)``: ``W h + b`` for the softmax, the unnormalized
        log-mixture for a mixture of softmaxes (what a discriminator reads through a sigmoid)."""
        if isinstance(self.output, SoftmaxOutput):
            return self.output.logits(out.output)
        return self.output.logits(out.output, self._doc_inputs(out))

    def output_log_probs(self, out: EncoderOutput) -> Tensor:
        """The output layer on an encoder output -> next-word log-probabilities ``(B, T, V)``."""
        if isinstance(self.output, SoftmaxOutput):
            return self.output.log_probs(out.output)
        return self.output.log_probs(out.output, self._doc_inputs(out))

    def _doc_inputs(self, out: EncoderOutput) -> list[Tensor]:
        """DOC: the undropped outputs ``(B, T, H_l)`` of the intermediate layers that feed experts."""
        return [out.layer_outputs[l] for l in self.doc_layers]

    def nll(self, ids: Tensor, targets: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """``ids, targets: (B, T)`` -> (per-token NLL ``(B, T)``, new state)."""
        out = self(ids, state)
        return self.output_nll(out, targets), out.state

    def log_probs(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """``ids: (B, T)`` -> (log-probabilities of the next word ``(B, T, V)``, new state)."""
        out = self(ids, state)
        return self.output_log_probs(out), out.state

    def num_parameters(self) -> int:
        """Number of parameter scalars; a tied matrix counts once."""
        return sum(p.numel() for p in self.parameters())


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """The parameter count of ``LanguageModel(cfg, vocab_size)``, built on the meta device:
    no memory is allocated, whatever the sizes."""
    with torch.device("meta"):
        return LanguageModel(cfg, vocab_size).num_parameters()
