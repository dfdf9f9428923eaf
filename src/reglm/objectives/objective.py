"""What a training run minimizes: the seam between the training loop and its loss.

The loop (:mod:`reglm.train.run`) owns the data order, BPTT windows, optimizer, averaging,
checkpoints and resume; an objective owns the per-token loss and how a split is scored for model
selection. The objectives are a registered family (``objective``, :data:`OBJECTIVES`); each kind's
``Config`` holds the options it reads, and ``objective.kind`` picks one:

``lm`` -- :class:`LMObjective`
    Cross-entropy (under AdvSoft while the loop says so) plus the output layer's penalty and
    Inan et al.'s augmented loss. With ``objective.base_model`` the run starts from that model's
    weights: plain cross-entropy fine-tuning, the baseline of Popov & Kudinov (2019). Its scores
    are perplexities (``reports_perplexity``): the final scores add the main stage's and, on the
    synthetic corpus, the comparison with the true distribution.
``discriminator`` -- :class:`DiscriminatorObjective`
    Popov & Kudinov eq. (6) against the frozen initial model q0 (``objective.base_model``), exact
    over the vocabulary; ``objective.init_from_base`` starts from q0's weights.
``reverse-kl`` -- :class:`ReverseKLObjective`
    Popov & Kudinov eq. (12): fine-tuning q_theta (started from q0, ``objective.base_model``)
    with the frozen ``objective.discriminator``, or with r = 1/2 when it is none.

Every kind's config says what it needs of the rest of the run (``check_with(run_config)``): the
two that read frozen models need an output layer with logits and a word-level corpus. Every kind
declares what its run's model is (``produces``: ``lm``, a language model, or ``discriminator``),
which the commands that read a model directory check (:func:`~reglm.rundir.require_kind`).

The adversarial softmax and the augmented loss are terms of the ``lm`` objective; the
discriminator and reverse-KL objectives score with the clean output layer and ignore them (the
``dfinetune`` presets switch AdvSoft off). Dropout, input noise and AR/TAR stay the loop's.

Frozen models read the same windows as the trained one and carry their own hidden state per
training stream (:class:`Frozen`); that state is part of the training checkpoint, so resume
stays exact. Frozen models always run in eval mode (no dropout): q0 and r are the fixed
functions the losses are defined with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from reglm.config import RunConfig
from reglm.config.fields import check, kind_field, option
from reglm.data.vocab import Vocab
from reglm.data.windows import Window
from reglm.encoders.base import EncoderOutput, State, concat_states, detach_state, select_streams, state_dict_of
from reglm.evaluate.perplexity import Reading, evaluate, perplexity, stream_pass
from reglm.modeldir import load_model_dir
from reglm.models import LanguageModel
from reglm.objectives.augmented_loss import AugmentedLoss
from reglm.objectives.base import Term
from reglm.objectives.reverse_kl import discriminator_loss_parts, finetune_loss
from reglm.outputs.base import OutputLoss, require
from reglm.rundir import require_kind, require_same_architecture, require_same_vocab

BASE_MODEL = "model directory of the initial model q0"


@dataclass(frozen=True)
class LMConfig:
    """The language-model loss, from scratch or from a base model's weights."""

    kind: str = kind_field("lm", "cross-entropy, from scratch or from a base model's weights")
    base_model: str | None = option(
        None, "start from the weights of this model directory (cross-entropy fine-tuning); none: from scratch"
    )

    def check_with(self, run: RunConfig) -> None:
        """The language-model loss fits every run."""


@dataclass(frozen=True)
class _FrozenModelsConfig:
    """The objectives that compare the trained model's word distribution with frozen models'."""

    kind: str = kind_field("discriminator", "Popov & Kudinov eq. (6) against the frozen q0")
    base_model: str | None = option(None, BASE_MODEL)

    def __post_init__(self) -> None:
        check(
            self.base_model is not None,
            "objective.base_model",
            f"objective {self.kind} needs the initial model q0; give its model directory",
        )

    def check_with(self, run: RunConfig) -> None:
        from reglm.config.kinds import component_class

        output = component_class("output", run.model.output, "model.output")
        require(output, "logits", "objective.kind", f"objective {self.kind} reads the output layer's logits")
        check(
            run.data.tokenizer == "word",
            "data.tokenizer",
            f"objective {self.kind} compares word distributions; use tokenizer=word",
        )


@dataclass(frozen=True)
class DiscriminatorConfig(_FrozenModelsConfig):
    """Popov & Kudinov eq. (6) against the frozen q0."""

    kind: str = kind_field("discriminator", "Popov & Kudinov eq. (6) against the frozen q0")
    init_from_base: bool = option(False, "start from the base model's weights instead of a fresh initialization")


@dataclass(frozen=True)
class ReverseKLConfig(_FrozenModelsConfig):
    """Popov & Kudinov eq. (12): fine-tuning q0 with a frozen discriminator."""

    kind: str = kind_field("reverse-kl", "Popov & Kudinov eq. (12): fine-tuning q0 with a frozen discriminator")
    base_model: str | None = option(None, f"{BASE_MODEL}, where fine-tuning starts")
    discriminator: str | None = option(
        None, "model directory of the trained discriminator (none: r = 1/2, the 'without discriminator' ablation)"
    )


@dataclass
class ObjectiveEval:
    """A scored split: ``metrics`` are logged as ``valid_<name>`` and written to ``results.json``;
    ``selection`` (lower is better) picks ``best/`` and drives NT-ASGD and the plateau schedule."""

    metrics: dict[str, float]
    selection: float


class Frozen:
    """A frozen model read alongside the trained one, carrying its own state per training stream."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.state: State | None = None
        self.started = False
        self._pending: list[State | None] = []

    @torch.no_grad()
    def run(self, x: Tensor, streams: slice, batch_size: int) -> EncoderOutput:
        """The model on the chunk ``x = batch[streams]``, from its carried state of those streams."""
        if not self.started:
            self.state, self.started = self.model.init_state(batch_size, device=x.device), True
        out = self.model(x, select_streams(self.state, streams))
        self._pending.append(detach_state(out.state))
        return out

    def end_step(self) -> None:
        self.state, self._pending = concat_states(self._pending), []

    def reset(self) -> None:
        self.state, self.started, self._pending = None, False, []


class LMObjective:
    """The language-model loss; see the module docstring."""

    Config = LMConfig
    kind = "lm"
    produces = "lm"
    reports_perplexity = True

    def __init__(self, config: RunConfig, vocab: Vocab, device: torch.device) -> None:
        self.config = config
        self.base = _load_base(config, vocab, device) if config.objective.base_model else None
        cfg = config.train.terms
        self.terms: list[Term] = (
            [AugmentedLoss(cfg.aug_gamma, cfg.aug_tau, cfg.aug_target_grad)] if cfg.aug_gamma > 0 else []
        )

    def prepare(self, model: LanguageModel) -> None:
        """At a fresh start: copy the base model's weights, if the run has one."""
        if self.base is not None:
            model.load_state_dict(self.base.state_dict())

    def initial_model(self) -> LanguageModel | None:
        return self.base

    def chunk_loss(
        self,
        model: LanguageModel,
        out: EncoderOutput,
        x: Tensor,
        y: Tensor,
        streams: slice,
        batch_size: int,
        adversarial: bool,
        keep_logits: bool = False,
    ) -> OutputLoss:
        return model.output.score(out, y, adversarial=adversarial, keep_logits=keep_logits)

    def end_step(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def score(
        self,
        model: LanguageModel,
        ids: Tensor,
        reading: Reading,
        device: torch.device,
        progress: bool,
        desc: str,
        word_ends: Tensor | None = None,
    ) -> ObjectiveEval:
        result = evaluate(model, ids, device=device, progress=progress, desc=desc, word_ends=word_ends, reading=reading)
        return ObjectiveEval(result.as_dict(), result.loss)


class _FrozenObjective:
    """Shared machinery of the objectives that read frozen models next to the trained one."""

    kind = ""
    reports_perplexity = False
    terms: list[Term] = []

    def __init__(self, frozen: list[LanguageModel]) -> None:
        self.frozen = [Frozen(m) for m in frozen]

    def end_step(self) -> None:
        for f in self.frozen:
            f.end_step()

    def reset(self) -> None:
        for f in self.frozen:
            f.reset()

    def state_dict(self) -> dict[str, Any]:
        return {"frozen_states": [state_dict_of(f.state) if f.started else None for f in self.frozen]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("frozen_states", [None] * len(self.frozen))
        for f, s in zip(self.frozen, saved):
            device = next(f.model.parameters()).device
            f.started = s is not None
            f.state = None if s is None else f.model.encoder.load_state(s).to(device)


class DiscriminatorObjective(_FrozenObjective):
    """Popov & Kudinov eq. (6) per token, the trained model read through a sigmoid per word."""

    Config = DiscriminatorConfig
    kind = "discriminator"
    produces = "discriminator"

    def __init__(self, config: RunConfig, vocab: Vocab, device: torch.device) -> None:
        self.q0 = _load_base(config, vocab, device)
        self.init_from_base = config.objective.init_from_base
        super().__init__([self.q0])

    def prepare(self, model: LanguageModel) -> None:
        if self.init_from_base:
            model.load_state_dict(self.q0.state_dict())

    def initial_model(self) -> LanguageModel | None:
        return None

    def chunk_loss(
        self,
        model: LanguageModel,
        out: EncoderOutput,
        x: Tensor,
        y: Tensor,
        streams: slice,
        batch_size: int,
        adversarial: bool,
        keep_logits: bool = False,
    ) -> OutputLoss:
        q0_out = self.frozen[0].run(x, streams, batch_size)
        with torch.no_grad():
            q0_log_probs = self.q0.output.predict(q0_out)
        loss_q, loss_p = discriminator_loss_parts(model.output.full_logits(out), q0_log_probs, y)
        return OutputLoss(loss_q + loss_p, loss_q.new_zeros(()))

    def score(
        self,
        model: LanguageModel,
        ids: Tensor,
        reading: Reading,
        device: torch.device,
        progress: bool,
        desc: str,
        word_ends: Tensor | None = None,
    ) -> ObjectiveEval:
        def per_token(outs: list[EncoderOutput], w: Window) -> dict[str, Tensor]:
            loss_q, loss_p = discriminator_loss_parts(
                model.output.full_logits(outs[0]), self.q0.output.predict(outs[1]), w.targets
            )
            return {"loss": loss_q + loss_p, "loss_q": loss_q, "loss_p": loss_p}

        metrics = score_split([model, self.q0], ids, reading, device, per_token, progress, desc)
        return ObjectiveEval(metrics, metrics["loss"])


class ReverseKLObjective(_FrozenObjective):
    """Popov & Kudinov eq. (12) per token: ``-log q_theta(w*) + t log t``."""

    Config = ReverseKLConfig
    kind = "reverse-kl"
    produces = "lm"

    def __init__(self, config: RunConfig, vocab: Vocab, device: torch.device) -> None:
        self.q0 = _load_base(config, vocab, device)
        self.disc = _load_discriminator(config, self.q0, vocab, device) if config.objective.discriminator else None
        super().__init__([self.q0] if self.disc is None else [self.q0, self.disc])

    def prepare(self, model: LanguageModel) -> None:
        model.load_state_dict(self.q0.state_dict())

    def initial_model(self) -> LanguageModel | None:
        return self.q0

    def _terms(self, model: LanguageModel, outs: list[EncoderOutput], y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(loss (12), NLL of q_theta, t log t) per token from the outputs of [q_theta, q0, r]."""
        log_q = -model.output.nll(outs[0], y)
        with torch.no_grad():
            log_q0 = -self.q0.output.nll(outs[1], y)
            disc = (
                None
                if self.disc is None
                else self.disc.output.full_logits(outs[2]).gather(-1, y.unsqueeze(-1)).squeeze(-1)
            )
        loss, t_log_t = finetune_loss(log_q, log_q0, disc)
        return loss, -log_q, t_log_t

    def chunk_loss(
        self,
        model: LanguageModel,
        out: EncoderOutput,
        x: Tensor,
        y: Tensor,
        streams: slice,
        batch_size: int,
        adversarial: bool,
        keep_logits: bool = False,
    ) -> OutputLoss:
        outs = [out, *(f.run(x, streams, batch_size) for f in self.frozen)]
        loss, _, _ = self._terms(model, outs, y)
        return OutputLoss(loss, loss.new_zeros(()))

    def score(
        self,
        model: LanguageModel,
        ids: Tensor,
        reading: Reading,
        device: torch.device,
        progress: bool,
        desc: str,
        word_ends: Tensor | None = None,
    ) -> ObjectiveEval:
        def per_token(outs: list[EncoderOutput], w: Window) -> dict[str, Tensor]:
            _, nll, t_log_t = self._terms(model, outs, w.targets)
            return {"nll": nll, "rev_kl": t_log_t}

        return reverse_kl_eval(
            score_split([model, *(f.model for f in self.frozen)], ids, reading, device, per_token, progress, desc)
        )


def reverse_kl_eval(means: dict[str, float]) -> ObjectiveEval:
    """Table 2's columns from the per-token means of the NLL and of ``t log t``: ``loss`` = CE +
    reverse KL (eq. 9 estimated), ``ppl``, ``rev_kl``; selection on the NLL (perplexity)."""
    nll, rev_kl = means["nll"], means["rev_kl"]
    metrics = {"loss": nll + rev_kl, "ppl": perplexity(nll), "rev_kl": rev_kl, "nll": nll, "tokens": means["tokens"]}
    return ObjectiveEval(metrics, nll)


def score_split(
    models: list[LanguageModel],
    ids: Tensor,
    reading: Reading,
    device: torch.device | str,
    per_token: Callable[[list[EncoderOutput], Window], dict[str, Tensor]],
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """One deterministic pass of several models over ``ids`` (:func:`~reglm.evaluate.perplexity.stream_pass`,
    every target once), each model carrying its own state; returns the mean over target tokens
    of every ``(B, T)`` term ``per_token(outputs, window)`` gives, and ``tokens``."""
    totals = stream_pass(models, reading.plan(ids), reading.bptt, per_token, device, progress, desc)
    return {**{name: float(mean) for name, mean in totals.means.items()}, "tokens": totals.tokens}


Objective = LMObjective | DiscriminatorObjective | ReverseKLObjective


OBJECTIVES: dict[str, Any] = {
    "lm": LMObjective,
    "discriminator": DiscriminatorObjective,
    "reverse-kl": ReverseKLObjective,
}
"""The objective registry (:data:`~reglm.config.kinds.FAMILIES` ``objective``)."""


def make_objective(config: RunConfig, vocab: Vocab, device: torch.device) -> Objective:
    """The objective ``config.objective.kind`` names, with its frozen models loaded and checked."""
    from reglm.config.kinds import component_class

    return component_class("objective", config.objective, "objective")(config, vocab, device)


def _load_base(config: RunConfig, vocab: Vocab, device: torch.device) -> LanguageModel:
    """The initial model q0 of ``objective.base_model``: same vocabulary and architecture as the run."""
    path = Path(str(config.objective.base_model))
    model, base_config, base_vocab = load_model_dir(path, device)
    require_kind(base_config.objective.kind, path, "lm")
    require_same_vocab(
        base_vocab, vocab, f"the base model {path}", "this run's corpus", "use the data it was trained on"
    )
    require_same_architecture(
        config.model,
        base_config.model,
        "this run's model",
        f"the objective needs the base model's ({path}) architecture",
    )
    return model


def _load_discriminator(config: RunConfig, q0: LanguageModel, vocab: Vocab, device: torch.device) -> LanguageModel:
    """The discriminator of ``objective.discriminator``: a discriminator run's model with q0's
    vocabulary and architecture."""
    path = Path(str(config.objective.discriminator))
    disc, disc_config, disc_vocab = load_model_dir(path, device)
    require_kind(disc_config.objective.kind, path, "discriminator")
    require_same_vocab(disc_vocab, vocab, f"the discriminator {path}", "the model", "train it for this model")
    require_same_architecture(disc_config.model, q0.cfg, f"the discriminator {path}", "train it for this model")
    return disc
