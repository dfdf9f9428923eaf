"""The ``train`` section of a run's configuration: the main stage's loop, and one section or
component per thing it is made of.

``train.batching``, ``train.optimizer``, ``train.averaging`` and ``train.schedule`` are components
chosen by kind (:data:`~reglm.config.kinds.FAMILIES`); ``train.terms`` (the regularization terms
the trainer adds to the loss), ``train.input_noise`` (its schedule), ``train.finetune`` (the
fine-tuning stage) and ``train.log`` (what the run logs as it goes) are plain sections. Their
flat names of before (``train.ar_alpha``, ``train.finetune_epochs``...) are aliases
(:data:`~reglm.config.aliases.ALIASES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from reglm.config.build import component
from reglm.config.fields import check, check_nonneg, option
from reglm.config.kinds import component_class, registry

NOISE_SCHEDULES = ("constant", "linear", "exponential")


@dataclass(frozen=True)
class TermsConfig:
    """The regularization terms added to the loss: AR/TAR (Merity et al.) and the augmented loss."""

    ar_alpha: float = option(2.0, "activation regularization coefficient (AR, on the dropped last-layer output)")
    tar_beta: float = option(1.0, "temporal activation regularization coefficient (TAR, on the undropped output)")
    aug_gamma: float = option(
        0.0,
        "augmented loss (Inan et al. eqs. 3.1-3.7): weight alpha = aug_gamma * aug_tau of KL(y_tilde || y_hat); 0: off",
    )
    aug_tau: float = option(20.0, "augmented loss temperature tau (Inan et al. appendix A: 20)")
    aug_target_grad: bool = option(
        False,
        "augmented loss: let gradient flow into the embedding through the target y_tilde = softmax(L^T u / tau) "
        "(false: y_tilde is a constant target)",
    )

    def __post_init__(self) -> None:
        for name in ("ar_alpha", "tar_beta"):
            check_nonneg(getattr(self, name), f"train.terms.{name}")
        check(
            math.isfinite(self.aug_gamma) and self.aug_gamma >= 0,
            "train.terms.aug_gamma",
            f"{self.aug_gamma} must be >= 0 (0 turns the augmented loss off)",
        )
        check(math.isfinite(self.aug_tau) and self.aug_tau > 0, "train.terms.aug_tau", f"{self.aug_tau} must be > 0")


@dataclass(frozen=True)
class InputNoiseConfig:
    """Gaussian noise on the input embeddings in the main stage (Wang et al. 2019, section 5)."""

    std: float = option(0.0, "std of the noise added to the input embeddings in training; 0: off")
    anneal: str = option(
        "constant",
        "its schedule over main-stage epochs: constant, linear (to 0 at train.input_noise.epochs) or exponential "
        "(half-life train.input_noise.epochs)",
    )
    epochs: float = option(100.0, "schedule length: linear: epochs to reach 0; exponential: half-life in epochs")

    def __post_init__(self) -> None:
        check_nonneg(self.std, "train.input_noise.std")
        check(
            self.anneal in NOISE_SCHEDULES,
            "train.input_noise.anneal",
            f"unknown {self.anneal!r}; choose constant, linear or exponential",
        )
        check(
            math.isfinite(self.epochs) and self.epochs > 0,
            "train.input_noise.epochs",
            f"{self.epochs} must be finite and > 0",
        )


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning stage: ASGD restarted with T=0 from the best model (AWD-LSTM section 5)."""

    enabled: bool = option(
        False,
        "after the main stage, restart ASGD with T=0 from the best model (AWD-LSTM section 5; needs "
        "train.averaging=ntasgd)",
    )
    epochs: int = option(500, "upper bound on fine-tuning epochs; the non-monotone criterion normally stops it first")
    lr: float | None = option(None, "learning rate of the fine-tuning stage (none: the optimizer's lr)")
    input_noise_std: float = option(
        0.0, "std of the input-embedding noise during fine-tuning (the authors' code: none)"
    )
    advsoft: bool = option(True, "keep AdvSoft on during the fine-tuning stage")

    def __post_init__(self) -> None:
        check(self.epochs >= 0, "train.finetune.epochs", "must be >= 0")
        check(
            self.lr is None or (math.isfinite(self.lr) and self.lr > 0),
            "train.finetune.lr",
            f"{self.lr} must be > 0 or none",
        )
        check_nonneg(self.input_noise_std, "train.finetune.input_noise_std")


@dataclass(frozen=True)
class LogConfig:
    """What the run logs as it goes."""

    interval: int = option(
        200, "log training metrics every this many steps (without a terminal, also print a progress line)"
    )
    tensorboard: bool = option(
        False,
        "also write the logged metrics as TensorBoard scalars into RUN/tensorboard/ (needs pip install "
        "'reglm[tensorboard]')",
    )

    def __post_init__(self) -> None:
        check(self.interval >= 1, "train.log.interval", f"{self.interval} must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization: the main stage's loop, its batching, optimizer, averaging and schedule, the
    regularization terms, the input noise, the fine-tuning stage and the log."""

    epochs: int = option(6, "epochs of the main stage")
    max_steps: int | None = option(
        None,
        "end the main stage after this many optimizer steps, mid-epoch if need be (the adaptive-input recipes "
        "count updates); none: train.epochs decides",
    )
    batching: Any = component("batching", "bptt", "how the training split is read, and validation")
    optimizer: Any = component("optimizer", "sgd", "optimizer")
    averaging: Any = component("averaging", "ntasgd", "averaging")
    schedule: Any = component("schedule", "decay", "learning-rate schedule")
    terms: TermsConfig = field(default_factory=TermsConfig, metadata={"help": "the regularization terms"})
    input_noise: InputNoiseConfig = field(
        default_factory=InputNoiseConfig, metadata={"help": "noise on the input embeddings"}
    )
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, metadata={"help": "the fine-tuning stage"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "what the run logs"})
    clip: float = option(0.25, "gradient clipping: maximum global norm (0: off)")
    sequence_loss: bool = option(
        False,
        "sum the token losses over each BPTT window and average over streams (Zaremba et al.'s and Inan et al.'s "
        "reduction; lr and clip then refer to that sum); false: mean per token",
    )
    advsoft_stop_epoch: int | None = option(None, "switch AdvSoft off after this main-stage epoch (none: keep it on)")
    precision: str = option(
        "fp32",
        "fp32, or bf16: autocast the forward pass to bfloat16 on CUDA (fp32 master weights; LayerNorm, softmax and "
        "the loss stay fp32); a CPU run stays fp32",
    )
    compile: bool = option(
        False, "run the forward pass through torch.compile (the uncompiled module is what checkpoints save)"
    )
    checkpoint_interval: int = option(
        0, "also write a resumable checkpoint every this many steps (0: only at epoch ends)"
    )
    device: str = option("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "train.epochs", f"{self.epochs} must be >= 1")
        check_nonneg(self.clip, "train.clip")
        if self.finetune.enabled:
            finetuning = [kind for kind, policy in registry("averaging").items() if policy.finetunes]
            check(
                component_class("averaging", self.averaging, "train.averaging").finetunes,
                "train.finetune.enabled",
                "is ASGD restarted from the best model and stopped by NT-ASGD's criterion; set "
                f"train.averaging={' or '.join(finetuning)} or train.finetune.enabled=false",
            )
        check(
            self.advsoft_stop_epoch is None or self.advsoft_stop_epoch >= 0,
            "train.advsoft_stop_epoch",
            "must be >= 0 or none",
        )
        check(self.checkpoint_interval >= 0, "train.checkpoint_interval", "must be >= 0")
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "train.device",
            f"unknown device {self.device!r}",
        )
        check(
            self.max_steps is None or self.max_steps >= 1, "train.max_steps", f"{self.max_steps} must be >= 1 or none"
        )
        check(self.precision in ("fp32", "bf16"), "train.precision", f"unknown {self.precision!r}; choose fp32 or bf16")
