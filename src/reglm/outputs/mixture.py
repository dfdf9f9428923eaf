"""Mixture of softmaxes (MoS; Yang, Dai, Salakhutdinov & Cohen 2018) and its direct output
connection extension (DOC; Takase, Suzuki & Nagata 2018).

MoS (Yang et al. 2018, section 3). From the last LSTM layer's (dropped) output ``g_t: (H,)``,
``K`` experts each project the context to the embedding size, take a softmax over the output
embedding ``W: (V, E)`` (tied: the input embedding) with the shared bias ``b: (V,)``, and are
mixed with a context-dependent prior::

    pi_t     = softmax(W_pi g_t)                     (K,)  mixture weights, no bias
    h_{t,k}  = tanh(W_k g_t + c_k)                   (E,)  the latent vector of expert k
    p(w | t) = sum_k pi_{t,k} softmax(W h_{t,k} + b)_w

The sum is computed in log space, ``log p(w | t) = logsumexp_k(log pi_{t,k} + log
softmax(W h_{t,k} + b)_w)``, so a word every expert finds unlikely keeps its exact
log-probability where mixing probabilities would underflow to 0 (the reference code adds 1e-8
before taking the log).

DOC (Takase et al. 2018) draws further experts from intermediate layers: layer ``l``
contributes ``i_l`` latent vectors ``tanh(W_{l,j} g^{(l)}_t + c_{l,j})`` of size ``E`` to the same
mixture, whose prior (computed from the last layer, over all experts) then has ``K = n_experts +
sum_l i_l`` entries. With no extra experts DOC is exactly MoS, parameters included. We feed the
intermediate experts the layer's undropped output (``EncoderOutput.layer_outputs``); the authors'
code feeds the output after the between-layer dropout. The latent dropout below applies to them all.

Choices and details:

* **Latent dropout**: locked dropout (one mask per sequence, shared over time) on the
  concatenated latent vectors ``(B, T, K*E)``, so each expert and feature has its own mask per
  sequence (the MoS code's ``dropoutl``; the DOC code shares one mask across experts).
* **AdvSoft** (Wang et al. 2019, :mod:`reglm.outputs.adversarial`): with ``adversarial=True``
  every expert's target logit is lowered by its own margin, ``W_y h_{t,k} + b_y -> W_y h_{t,k} +
  b_y - epsilon_y ||h_{t,k}||`` with ``h_{t,k}`` that expert's (dropped) latent vector, *before*
  the experts are mixed; ``log_probs`` and ``nll(adversarial=False)`` are always clean.
* **Initialization**: the prior and latent projections keep ``torch.nn.Linear``'s default
  (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), as the MoS code; an untied ``W`` is ``U(-0.1, 0.1)``
  and ``b`` zeros, as :class:`~reglm.outputs.softmax.SoftmaxOutput`.
* **Memory**: ``N = B*T`` tokens give ``N*K`` expert rows of ``V`` logits, which MoS cannot avoid.
  ``nll`` keeps only the target's log-probability per expert (the fused cross-entropy holds one
  ``(N*K, V)`` log-softmax for backward besides the logits); ``log_probs`` needs the full
  ``(N, K, V)`` mixture.

The DOC penalty on the mixture weights is :func:`mixture_weight_penalty`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, check_nonneg, check_prob, kind_field, option
from reglm.config.kinds import component_class
from reglm.encoders.base import EncoderOutput
from reglm.layers.dropout import LockedDropout
from reglm.layers.inference import Frozen
from reglm.outputs.adversarial import AdvSoft, AdvSoftConfig, perturb_target_logits_
from reglm.outputs.base import OutputLayer, OutputLoss


@dataclass(frozen=True)
class MixtureConfig(ComponentConfig):
    """A mixture of softmaxes (``mos``), with experts from intermediate layers too (``doc``)."""

    kind: str = kind_field(
        "mos",
        "mixture of softmaxes, Yang et al. 2018; doc: with experts from intermediate layers too, Takase et al. 2018",
    )
    tie_weights: bool = option(True, "share the input embedding with the experts' output embedding", arch=True)
    n_experts: int = option(15, "softmax experts computed from the last encoder layer", arch=True)
    latent_dropout: float = option(
        0.1, "locked dropout on the experts' latent vectors tanh(W_k h) (the MoS code's dropoutl)"
    )
    doc_experts: str | None = option(
        None,
        "doc: extra experts per intermediate layer, comma-separated counts for layers 1..L-1 (e.g. 0,5 with 3 "
        "layers); none: no extra experts",
        arch=True,
    )
    mixture_penalty: float = option(
        0.0, "coefficient lambda_beta of DOC's penalty on the variation of the mixture weights (the DOC code's --var)"
    )
    advsoft: AdvSoftConfig = option(AdvSoftConfig(), "the adversarial softmax, per expert")

    def __post_init__(self) -> None:
        check(self.n_experts >= 1, "model.output.n_experts", f"{self.n_experts} must be >= 1")
        check_prob(self.latent_dropout, "model.output.latent_dropout")
        check_nonneg(self.mixture_penalty, "model.output.mixture_penalty")
        check(
            self.doc_experts is None or self.kind == "doc",
            "model.output.doc_experts",
            f"is only read with kind=doc (now {self.kind}); set it to none",
        )

    def check_with(self, model: Any) -> None:
        """DOC's counts name the encoder's intermediate layers; tying needs a word embedding."""
        self.doc_expert_counts(len(model.encoder.layer_sizes(model.input.output_size)))
        check(
            not self.tie_weights or "word-matrix" in component_class("input", model.input).capabilities,
            "model.output.tie_weights",
            f"a mixture ties to a word embedding, not to input layer {model.input.kind}; set tie_weights=false",
        )

    def doc_expert_counts(self, num_layers: int) -> tuple[int, ...]:
        """The extra DOC experts of encoder layers ``1 .. num_layers - 1`` (0-based layer
        ``l - 1``), parsed from ``doc_experts``; all zeros when it is None."""
        if self.doc_experts is None:
            return (0,) * (num_layers - 1)
        items = [item.strip() for item in self.doc_experts.split(",")]
        check(
            all(item.isdigit() for item in items),
            "model.output.doc_experts",
            f"{self.doc_experts!r} must be comma-separated counts >= 0, e.g. 0,5",
        )
        check(
            len(items) == num_layers - 1,
            "model.output.doc_experts",
            f"{self.doc_experts!r} gives {len(items)} count(s); give one per intermediate layer ({num_layers - 1} "
            f"for {num_layers} encoder layers)",
        )
        return tuple(int(item) for item in items)


@dataclass
class MixtureScore:
    """``nll: (B, T)`` per-token negative log-likelihood and ``weights: (B, T, K)`` the mixture
    weights ``pi_t`` it was computed with (what the DOC penalty reads)."""

    nll: Tensor
    weights: Tensor


class MixtureOfSoftmaxes(OutputLayer):
    """The MoS output layer (with DOC's extra experts when ``extra_inputs`` is given); see the module docstring.

    * ``in_features``: ``H``, the size of the last layer's output ``g_t``;
    * ``emb_size``: ``E``, the size of the latent vectors and of the output embedding;
    * ``n_experts``: experts computed from the last layer;
    * ``extra_inputs``: DOC, one ``(features, experts)`` pair per extra input, in the order the
      ``extra`` tensors are passed to :meth:`log_probs` / :meth:`nll_of` / :meth:`mix_score`;
    * ``tied_weight``: the ``(V, E)`` Parameter to share (weight tying), else the layer owns one.

    Parameters: ``prior.weight: (K, H)``, ``latent.weight: (n_experts*E, H)`` and ``latent.bias``,
    ``extra_latents.i.weight: (k_i*E, features_i)`` and biases, ``weight: (V, E)``, ``bias: (V,)``.
    The latent vectors are ordered last-layer experts first, then each extra input's.
    """

    Config = MixtureConfig
    capabilities = frozenset({"logits", "advsoft"})
    """no ``softmax-logits``: the log-mixture is not a logit vector whose softmax is the mixture"""

    def __init__(
        self,
        in_features: int,
        emb_size: int,
        vocab_size: int,
        n_experts: int,
        latent_dropout: float = 0.0,
        tied_weight: nn.Parameter | None = None,
        advsoft: AdvSoft | None = None,
        extra_inputs: Sequence[tuple[int, int]] = (),
    ) -> None:
        super().__init__()
        if n_experts < 1 or any(k < 1 for _, k in extra_inputs):
            raise ValueError(
                f"every expert count must be >= 1, got n_experts={n_experts}, extra_inputs={list(extra_inputs)}"
            )
        self.in_features = in_features
        self.emb_size = emb_size
        self.vocab_size = vocab_size
        self.n_experts = n_experts
        self.extra_inputs = tuple((int(f), int(k)) for f, k in extra_inputs)
        self.total_experts = n_experts + sum(k for _, k in self.extra_inputs)
        self.advsoft = advsoft
        self.prior = nn.Linear(in_features, self.total_experts, bias=False)
        self.latent = nn.Linear(in_features, n_experts * emb_size)
        self.extra_latents = nn.ModuleList(nn.Linear(f, k * emb_size) for f, k in self.extra_inputs)
        self.latent_dropout = LockedDropout(latent_dropout)
        if tied_weight is None:
            self.weight = nn.Parameter(torch.empty(vocab_size, emb_size).uniform_(-0.1, 0.1))
        else:
            if tuple(tied_weight.shape) != (vocab_size, emb_size):
                raise ValueError(
                    f"tied weight has shape {tuple(tied_weight.shape)}, expected ({vocab_size}, {emb_size})"
                )
            self.weight = tied_weight
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.extra_layers: list[int] = []
        self.penalty = 0.0

    @classmethod
    def from_config(
        cls, cfg: MixtureConfig, in_features: int, vocab_size: int, input_layer: nn.Module, encoder: nn.Module
    ) -> MixtureOfSoftmaxes:
        """DOC's extra experts read the encoder layers ``cfg.doc_experts`` names."""
        counts = cfg.doc_expert_counts(len(encoder.layer_sizes))
        extra_layers = [li for li, k in enumerate(counts) if k > 0]
        tied = input_layer.tied_weight() if cfg.tie_weights else None
        emb_size = input_layer.output_size
        layer = cls(
            in_features,
            emb_size,
            vocab_size,
            cfg.n_experts,
            cfg.latent_dropout,
            tied,
            cfg.advsoft.build(),
            [(encoder.layer_sizes[li], counts[li]) for li in extra_layers],
        )
        layer.extra_layers, layer.penalty = extra_layers, cfg.mixture_penalty
        return layer

    def _extra(self, out: EncoderOutput) -> list[Tensor]:
        """DOC: the undropped outputs ``(B, T, H_l)`` of the intermediate layers that feed experts."""
        return [out.layer_outputs[li] for li in self.extra_layers]

    def score(
        self, out: EncoderOutput, targets: Tensor, adversarial: bool = False, keep_logits: bool = False
    ) -> OutputLoss:
        """The NLL and DOC's penalty ``lambda_beta * mixture_weight_penalty(pi)`` from one mixture."""
        if keep_logits:
            raise ValueError("a mixture of softmaxes has no softmax logits to keep")
        mixed = self.mix_score(out.output, targets, adversarial, self._extra(out))
        penalty = self.penalty * mixture_weight_penalty(mixed.weights) if self.penalty > 0 else mixed.nll.new_zeros(())
        return OutputLoss(mixed.nll, penalty)

    def predict(self, out: EncoderOutput) -> Tensor:
        return self.log_probs(out.output, self._extra(out))

    def full_logits(self, out: EncoderOutput) -> Tensor:
        return self.logits(out.output, self._extra(out))

    def mixture(self, h: Tensor, extra: Sequence[Tensor] = ()) -> tuple[Tensor, Tensor]:
        """``h: (B, T, H)``, ``extra``: DOC's ``(B, T, features_i)`` -> (``log pi: (B*T, K)``, the
        dropped latent vectors ``(B*T*K, E)``, row ``n*K + k`` for token ``n`` and expert ``k``)."""
        if len(extra) != len(self.extra_latents):
            raise ValueError(f"expected {len(self.extra_latents)} extra input(s), got {len(extra)}")
        log_prior = F.log_softmax(self.prior(h), dim=-1).reshape(-1, self.total_experts)
        latents = [self.latent(h), *(proj(x) for proj, x in zip(self.extra_latents, extra))]
        latent = torch.tanh(latents[0] if len(latents) == 1 else torch.cat(latents, dim=-1))
        return log_prior, self.latent_dropout(latent).reshape(-1, self.emb_size)

    def log_probs(self, h: Tensor, extra: Sequence[Tensor] = ()) -> Tensor:
        """``h: (B, T, H) -> (B, T, V)``: ``log sum_k pi_k softmax(W h_k + b)``, mixed in log space."""
        log_prior, latent = self.mixture(h, extra)
        expert_log_probs = F.log_softmax(F.linear(latent, self.weight, self.bias), dim=-1).view(
            -1, self.total_experts, self.vocab_size
        )
        return log_mixture(expert_log_probs, log_prior).view(*h.shape[:-1], self.vocab_size)

    def logits(self, h: Tensor, extra: Sequence[Tensor] = ()) -> Tensor:
        """``h: (B, T, H) -> (B, T, V)``: the unnormalized log-mixture ``log sum_k pi_k exp(W h_k + b)``.

        A mixture has no single logit vector; this is the one whose softmax-free reading a
        discriminator with the mixture's architecture uses (Popov & Kudinov: "the same
        architecture ... only the interpretation of logits changes"). With one expert it is the
        plain ``W h_1 + b``.
        """
        log_prior, latent = self.mixture(h, extra)
        expert_logits = F.linear(latent, self.weight, self.bias).view(-1, self.total_experts, self.vocab_size)
        return log_mixture(expert_logits, log_prior).view(*h.shape[:-1], self.vocab_size)

    def mix_score(
        self, h: Tensor, targets: Tensor, adversarial: bool = False, extra: Sequence[Tensor] = ()
    ) -> MixtureScore:
        """``h: (B, T, H)``, ``targets: (B, T)`` -> :class:`MixtureScore`; under AdvSoft (per
        expert, before mixing) when ``adversarial`` (needs ``advsoft``)."""
        log_prior, latent = self.mixture(h, extra)
        expert_targets = targets.reshape(-1).repeat_interleave(self.total_experts)
        logits = F.linear(latent, self.weight, self.bias)
        if adversarial:
            if self.advsoft is None:
                raise ValueError("adversarial=True needs an output layer built with advsoft")
            target_weight = F.embedding(expert_targets, self.weight) if self.advsoft.needs_target_weight() else None
            perturb_target_logits_(logits, expert_targets, self.advsoft.margin(latent, target_weight))
        expert_log_p = -F.cross_entropy(logits, expert_targets, reduction="none").view(-1, self.total_experts)
        log_p = torch.logsumexp(log_prior + expert_log_p, dim=-1)
        return MixtureScore(
            nll=-log_p.view(targets.shape), weights=log_prior.exp().view(*targets.shape, self.total_experts)
        )

    def nll_of(self, h: Tensor, targets: Tensor, adversarial: bool = False, extra: Sequence[Tensor] = ()) -> Tensor:
        """``h: (B, T, H)``, ``targets: (B, T)`` -> ``(B, T)``: ``-log p(targets | h)`` per token."""
        return self.mix_score(h, targets, adversarial, extra).nll

    def export_module(self, frozen: Frozen) -> nn.Module:
        """:class:`MixtureExport`; a tied decoder stays the input layer's tensor."""
        layers = zip(self.extra_latents, self.extra_layers)
        extra = [ExtraLatent(frozen.linear(proj.weight, proj.bias), li) for proj, li in layers]
        prior, latent = frozen.linear(self.prior.weight), frozen.linear(self.latent.weight, self.latent.bias)
        decoder = frozen.linear(self.weight, self.bias, share=True)
        return MixtureExport(prior, latent, extra, decoder, self.total_experts, self.emb_size)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, emb_size={self.emb_size}, vocab_size={self.vocab_size}, "
            f"n_experts={self.n_experts}, extra_inputs={list(self.extra_inputs)}, advsoft={self.advsoft}"
        )


class ExtraLatent(nn.Module):
    """DOC's latent projection of encoder layer ``layer``, in the export: ``layers -> (B, T, k E)``."""

    def __init__(self, proj: nn.Linear, layer: int) -> None:
        super().__init__()
        self.proj = proj
        self.layer = layer

    def forward(self, layers: list[Tensor]) -> Tensor:
        return self.proj(layers[self.layer])


class MixtureExport(nn.Module):
    """The mixture's export module, at evaluation (no latent dropout): ``log sum_k pi_k
    softmax(W h_k + b)`` (:meth:`MixtureOfSoftmaxes.log_probs`) for ``forward(h, layers)``."""

    def __init__(
        self,
        prior: nn.Linear,
        latent: nn.Linear,
        extra: list[ExtraLatent],
        decoder: nn.Linear,
        experts: int,
        emb_size: int,
    ) -> None:
        super().__init__()
        self.prior = prior
        self.latent = latent
        self.extra_latents = nn.ModuleList(extra)
        self.decoder = decoder
        self.experts = experts
        self.emb_size = emb_size

    def forward(self, h: Tensor, layers: list[Tensor]) -> Tensor:
        log_prior = F.log_softmax(self.prior(h), dim=-1)  # (B, T, K)
        latents = [self.latent(h)]
        for extra in self.extra_latents:
            latents.append(extra(layers))
        latent = torch.tanh(torch.cat(latents, dim=-1)).view(h.size(0), h.size(1), self.experts, self.emb_size)
        return log_mixture(F.log_softmax(self.decoder(latent), dim=-1), log_prior)  # experts (B, T, K, V)


def log_mixture(expert_scores: Tensor, log_prior: Tensor) -> Tensor:
    """``log sum_k pi_k exp(s_{k,w})``, computed as ``logsumexp_k(log pi_k + s_{k,w})``:
    ``expert_scores: (..., K, V)``, ``log_prior: (..., K)`` -> ``(..., V)``. On the experts'
    log-softmaxes it is the mixture's log-probabilities; on their logits, the unnormalized
    log-mixture a discriminator reads (:meth:`MixtureOfSoftmaxes.logits`). With ``K = 1`` it
    returns the expert's scores."""
    return torch.logsumexp(expert_scores + log_prior.unsqueeze(-1), dim=-2)


def mixture_weight_penalty(weights: Tensor) -> Tensor:
    """DOC's penalty on the mixture weights (Takase et al. 2018; ``--var`` of the authors' code),
    without its coefficient: ``weights: (B, T, K) -> ()``::

        beta    = sum_t pi_t                          (B, K)  weight each stream gives each expert
        penalty = (K - 1) * Var(beta) / mean(beta)^2

    with ``Var`` the unbiased variance over all ``B*K`` entries of ``beta`` and ``mean`` their mean
    (``T / K``, since every ``pi_t`` sums to 1). It is the squared coefficient of variation of the
    summed weights scaled by ``K - 1``, exactly what the authors' training script adds (times
    ``lambda_beta``) per forward chunk; it is 0 when every stream spreads its weight evenly and
    grows as the weight concentrates on few experts. 0 for ``K = 1``.
    """
    k = weights.size(-1)
    if k == 1:
        return weights.new_zeros(())
    beta = weights.sum(dim=1)
    return (k - 1) * beta.var() / beta.mean().square()
