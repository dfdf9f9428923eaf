"""Run configuration: frozen dataclasses, one per stage, plus presets and ``key=value`` overrides.

Every field carries a one-line help text in its metadata; ``reglm config`` prints them all.
A run directory stores the whole :class:`RunConfig` as ``config.json`` and every checkpoint
stores it again, so a model can always be rebuilt from what is on disk.

Overrides are ``section.field=value`` (``train.lr=20``) or, when the field name is unique
across sections, just ``field=value`` (``lr=20``). Values are parsed as YAML scalars and then
checked against the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from reglm.errors import ReglmError


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


def _check(cond: bool, option: str, message: str) -> None:
    if not cond:
        raise ReglmError(f"invalid option {option}: {message}")


def _check_prob(value: float, option: str) -> None:
    _check(math.isfinite(value) and 0.0 <= value < 1.0, option, f"{value} must be in [0, 1)")


MAX_SEED = 2**63 - 1


def _check_seed(value: int, option: str) -> None:
    _check(0 <= value <= MAX_SEED, option, f"{value} must be in [0, 2^63 - 1]")


def _check_nonneg(value: float, option: str) -> None:
    _check(math.isfinite(value) and value >= 0, option, f"{value} must be finite and >= 0")


@dataclass(frozen=True)
class DataConfig:
    """Which corpus to read and how to build its vocabulary."""

    name: str = _f("synthetic", "ptb, wikitext-2, wikitext-103, synthetic, or a directory holding train.txt/valid.txt/test.txt")
    data_dir: str | None = _f(None, "download cache for built-in corpora (default: $REGLM_DATA_DIR or ~/.cache/reglm)")
    min_freq: int = _f(1, "training words seen fewer times become <unk>")
    max_vocab: int | None = _f(None, "keep only the most frequent training words (<unk> and <eos> included)")
    synthetic_seed: int = _f(0, "seed of the synthetic trigram language (its table and its samples)")
    synthetic_sentences: int = _f(80000, "synthetic corpus: training sentences; valid and test get one eighth each (80k/10k/10k)")

    def __post_init__(self) -> None:
        _check(self.min_freq >= 1, "data.min_freq", f"{self.min_freq} must be >= 1")
        _check(self.max_vocab is None or self.max_vocab >= 3, "data.max_vocab", f"{self.max_vocab} must be >= 3 or none")
        _check(self.synthetic_sentences >= 8, "data.synthetic_sentences", f"{self.synthetic_sentences} must be >= 8")
        _check_seed(self.synthetic_seed, "data.synthetic_seed")


@dataclass(frozen=True)
class ModelConfig:
    """The language model: input layer, encoder, output layer (see DESIGN in the README)."""

    encoder: str = _f("awd-lstm", "encoder: awd-lstm (Merity et al.) or vd-lstm (Zaremba et al.'s LSTM with Inan et al.'s variational dropout; hidden_dropout is its one probability)")
    emb_size: int = _f(200, "word embedding size (input and, when tied, output)")
    hidden_size: int = _f(256, "LSTM hidden size of every layer but the last")
    last_hidden_size: int | None = _f(None, "hidden size of the last LSTM layer (none: emb_size; MoS's nhidlast; with output=softmax and tie_weights it must equal emb_size)")
    num_layers: int = _f(2, "number of stacked LSTM layers")
    tie_weights: bool = _f(True, "share the input embedding with the output projection (Inan et al.; Press & Wolf)")
    embed_dropout: float = _f(0.0, "embedding dropout: probability of dropping a whole word type per batch (AWD-LSTM 4.3)")
    input_dropout: float = _f(0.1, "locked dropout on the embedding output (AWD-LSTM 4.2)")
    hidden_dropout: float = _f(0.1, "locked dropout between LSTM layers")
    output_dropout: float = _f(0.1, "locked dropout on the last LSTM layer's output")
    weight_dropout: float = _f(0.0, "DropConnect on the hidden-to-hidden weights (AWD-LSTM section 2)")
    init_range: float = _f(0.1, "embeddings and an untied output projection are initialized U(-init_range, init_range); so is every vd-lstm weight")
    output_bias: bool = _f(True, "the softmax output layer has a bias; false: fixed at zero (Inan et al.'s reused embeddings, RE)")
    advsoft: str | None = _f(None, "adversarial softmax (Wang et al. 2019): none (off), relative (epsilon_y = advsoft_alpha * ||w_y||) or fixed (advsoft_epsilon)")
    advsoft_alpha: float = _f(0.005, "AdvSoft relative mode: epsilon_y = alpha * ||w_y|| (the Remark after Algorithm 1)")
    advsoft_epsilon: float = _f(0.01, "AdvSoft fixed mode: the radius epsilon of the perturbation ball")
    advsoft_grad: str = _f("stop", "gradient through the margin epsilon_y*||h||: stop (none; Algorithm 1), hidden (through ||h||, as the authors' code), full (ablation)")
    advsoft_positive_only: bool = _f(False, "perturb only tokens with cos(h, w_y) > 0 (the authors' code; the paper perturbs all)")
    output: str = _f("softmax", "output layer: softmax, mos (mixture of softmaxes, Yang et al. 2018) or doc (MoS with experts from intermediate layers too, Takase et al. 2018)")
    n_experts: int = _f(15, "output=mos/doc: softmax experts computed from the last LSTM layer")
    latent_dropout: float = _f(0.1, "output=mos/doc: locked dropout on the experts' latent vectors tanh(W_k h) (the MoS code's dropoutl)")
    doc_experts: str | None = _f(None, "output=doc: extra experts per intermediate LSTM layer, comma-separated counts for layers 1..num_layers-1 (e.g. 0,5 with 3 layers); none: no extra experts")
    mixture_penalty: float = _f(0.0, "output=mos/doc: coefficient lambda_beta of DOC's penalty on the variation of the mixture weights (the DOC code's --var)")

    def __post_init__(self) -> None:
        _check(self.encoder in ("awd-lstm", "vd-lstm"), "model.encoder", f"unknown encoder {self.encoder!r}; choose awd-lstm or vd-lstm")
        _check(self.advsoft in (None, "relative", "fixed"), "model.advsoft", f"unknown {self.advsoft!r}; choose none, relative or fixed")
        for name in ("advsoft_alpha", "advsoft_epsilon"):
            _check_nonneg(getattr(self, name), f"model.{name}")
        _check(self.advsoft_grad in ("stop", "hidden", "full"), "model.advsoft_grad", f"unknown {self.advsoft_grad!r}; choose stop, hidden or full")
        for name in ("emb_size", "hidden_size", "num_layers"):
            _check(getattr(self, name) >= 1, f"model.{name}", f"{getattr(self, name)} must be >= 1")
        for name in ("embed_dropout", "input_dropout", "hidden_dropout", "output_dropout", "weight_dropout"):
            _check_prob(getattr(self, name), f"model.{name}")
        _check(self.init_range > 0, "model.init_range", f"{self.init_range} must be > 0")
        _check(self.last_hidden_size is None or self.last_hidden_size >= 1, "model.last_hidden_size", f"{self.last_hidden_size} must be >= 1 or none")
        _check(self.output in ("softmax", "mos", "doc"), "model.output", f"unknown {self.output!r}; choose softmax, mos or doc")
        _check(self.n_experts >= 1, "model.n_experts", f"{self.n_experts} must be >= 1")
        _check_prob(self.latent_dropout, "model.latent_dropout")
        _check_nonneg(self.mixture_penalty, "model.mixture_penalty")
        if self.encoder == "vd-lstm":
            for name in ("output_dropout", "weight_dropout"):
                _check(
                    getattr(self, name) == 0, f"model.{name}",
                    f"is not read by encoder=vd-lstm, whose one dropout probability is model.hidden_dropout (it also drops the last layer's output with that layer's recurrent mask); set {name}=0",
                )
            _check(self.last_hidden_size is None, "model.last_hidden_size", "vd-lstm layers all have hidden_size units; set last_hidden_size=none")
            _check(
                not (self.tie_weights and self.output == "softmax") or self.emb_size == self.hidden_size, "model.tie_weights",
                f"reused embeddings need emb_size = hidden_size with a vd-lstm encoder (now {self.emb_size} vs {self.hidden_size}): the tied softmax reads the "
                "last layer's hidden state directly, without a projection; set emb_size=hidden_size, tie_weights=false, or output=mos (which projects)",
            )
        _check(self.output_bias or self.output == "softmax", "model.output_bias", f"false is only supported by output=softmax (now {self.output}); set output_bias=true")
        if self.output == "softmax":
            _check(
                not self.tie_weights or self.last_hidden_size in (None, self.emb_size), "model.last_hidden_size",
                f"{self.last_hidden_size} differs from emb_size {self.emb_size}, but with output=softmax and tie_weights the last LSTM layer "
                "feeds the tied embedding directly; set last_hidden_size=none, tie_weights=false, or output=mos",
            )
            _check(self.mixture_penalty == 0, "model.mixture_penalty", "penalizes mixture weights, which only output=mos or doc has; set it to 0")
        _check(self.doc_experts is None or self.output == "doc", "model.doc_experts", f"is only read with output=doc (now {self.output}); set it to none")
        self.doc_expert_counts()

    def doc_expert_counts(self) -> tuple[int, ...]:
        """The extra DOC experts of LSTM layers ``1 .. num_layers - 1`` (0-based layer ``l - 1``),
        parsed from ``doc_experts``; all zeros when it is None."""
        if self.doc_experts is None:
            return (0,) * (self.num_layers - 1)
        items = [item.strip() for item in self.doc_experts.split(",")]
        _check(all(item.isdigit() for item in items), "model.doc_experts", f"{self.doc_experts!r} must be comma-separated counts >= 0, e.g. 0,5")
        _check(
            len(items) == self.num_layers - 1, "model.doc_experts",
            f"{self.doc_experts!r} gives {len(items)} count(s); give one per intermediate layer ({self.num_layers - 1} for num_layers={self.num_layers})",
        )
        return tuple(int(item) for item in items)


@dataclass(frozen=True)
class TrainConfig:
    """Optimization: SGD / NT-ASGD, variable BPTT, regularization terms, checkpointing."""

    epochs: int = _f(6, "epochs of the main stage")
    batch_size: int = _f(32, "training streams per batch")
    small_batch_size: int | None = _f(None, "gradient accumulation: streams per forward/backward chunk, each with its own carried state, one step per batch (none: batch_size; the MoS code's small_batch_size)")
    eval_batch_size: int = _f(10, "streams per batch for validation")
    test_batch_size: int = _f(1, "streams per batch for the final test evaluation")
    bptt: int = _f(35, "base BPTT length")
    variable_bptt: bool = _f(True, "sample the BPTT length per batch (AWD-LSTM 4.1); false: always bptt")
    bptt_p: float = _f(0.95, "probability of the full base length; otherwise half of it")
    bptt_std: float = _f(5.0, "standard deviation of the sampled length around the base")
    bptt_min: int = _f(5, "shortest sampled BPTT length")
    bptt_max: int | None = _f(None, "longest sampled BPTT length (none: no cap)")
    lr: float = _f(20.0, "SGD learning rate, rescaled per batch by seq_len / bptt")
    clip: float = _f(0.25, "gradient clipping: maximum global norm (0: off)")
    weight_decay: float = _f(1.2e-6, "L2 weight decay of SGD")
    ar_alpha: float = _f(2.0, "activation regularization coefficient (AR, on the dropped last-layer output)")
    tar_beta: float = _f(1.0, "temporal activation regularization coefficient (TAR, on the undropped output)")
    optimizer: str = _f("ntasgd", "ntasgd: SGD then averaging once the trigger fires; sgd: never average")
    trigger: str = _f("reference", "NT-ASGD trigger: reference (worse than the best older than n logs) or paper (Algorithm 1)")
    nonmono: int = _f(5, "non-monotone interval n of NT-ASGD")
    finetune: bool = _f(False, "after the main stage, restart ASGD with T=0 from the best model (AWD-LSTM section 5)")
    finetune_epochs: int = _f(500, "upper bound on fine-tuning epochs; the non-monotone criterion normally stops it first")
    finetune_lr: float | None = _f(None, "learning rate of the fine-tuning stage (none: train.lr)")
    lr_decay: float = _f(1.0, "main stage: multiply the learning rate by this every epoch after lr_decay_start (Zaremba et al.; Inan et al. appendix A: 0.9 / 0.97); 1: no decay")
    lr_decay_start: int = _f(0, "main-stage epoch after which lr_decay applies: epoch e runs at lr * lr_decay ** max(0, e - lr_decay_start)")
    plateau_factor: float | None = _f(None, "multiply the learning rate by this whenever an epoch does not improve the best validation loss (Popov & Kudinov's synthetic study: 0.1); none: off")
    sequence_loss: bool = _f(False, "sum the token losses over each BPTT window and average over streams (Zaremba et al.'s and Inan et al.'s reduction; lr and clip then refer to that sum); false: mean per token")
    aug_gamma: float = _f(0.0, "augmented loss (Inan et al. eqs. 3.1-3.7): weight alpha = aug_gamma * aug_tau of KL(y_tilde || y_hat); 0: off")
    aug_tau: float = _f(20.0, "augmented loss temperature tau (Inan et al. appendix A: 20)")
    aug_target_grad: bool = _f(False, "augmented loss: let gradient flow into the embedding through the target y_tilde = softmax(L^T u / tau) (false: y_tilde is a constant target)")
    advsoft_stop_epoch: int | None = _f(None, "switch AdvSoft off after this main-stage epoch (none: keep it on)")
    advsoft_finetune: bool = _f(True, "keep AdvSoft on during the fine-tuning stage")
    input_noise_std: float = _f(0.0, "std of Gaussian noise added to the input embeddings in training (Wang et al. 2019, section 5)")
    input_noise_anneal: str = _f("constant", "input noise schedule over main-stage epochs: constant, linear (to 0 at input_noise_epochs) or exponential (half-life input_noise_epochs)")
    input_noise_epochs: float = _f(100.0, "input noise schedule length: linear: epochs to reach 0; exponential: half-life in epochs")
    finetune_input_noise_std: float = _f(0.0, "std of the input-embedding noise during fine-tuning (the authors' code: none)")
    log_interval: int = _f(200, "log training metrics every this many steps")
    checkpoint_interval: int = _f(0, "also write a resumable checkpoint every this many steps (0: only at epoch ends)")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "test_batch_size", "bptt", "bptt_min", "nonmono", "log_interval"):
            _check(getattr(self, name) >= 1, f"train.{name}", f"{getattr(self, name)} must be >= 1")
        _check(self.bptt_max is None or self.bptt_max >= self.bptt_min, "train.bptt_max", "must be >= train.bptt_min or none")
        _check(
            self.small_batch_size is None or (self.small_batch_size >= 1 and self.batch_size % self.small_batch_size == 0), "train.small_batch_size",
            f"{self.small_batch_size} must divide train.batch_size ({self.batch_size}) or be none",
        )
        _check(0.0 <= self.bptt_p <= 1.0, "train.bptt_p", f"{self.bptt_p} must be in [0, 1]")
        _check(self.bptt_std >= 0, "train.bptt_std", f"{self.bptt_std} must be >= 0")
        for name in ("lr", "clip", "weight_decay", "ar_alpha", "tar_beta", "input_noise_std", "finetune_input_noise_std"):
            _check_nonneg(getattr(self, name), f"train.{name}")
        _check(self.lr > 0, "train.lr", f"{self.lr} must be > 0")
        _check(self.finetune_lr is None or (math.isfinite(self.finetune_lr) and self.finetune_lr > 0), "train.finetune_lr", f"{self.finetune_lr} must be > 0 or none")
        _check(self.optimizer in ("ntasgd", "sgd"), "train.optimizer", f"unknown {self.optimizer!r}; choose ntasgd or sgd")
        _check(self.trigger in ("reference", "paper"), "train.trigger", f"unknown {self.trigger!r}; choose reference or paper")
        _check(self.finetune_epochs >= 0, "train.finetune_epochs", "must be >= 0")
        _check(self.advsoft_stop_epoch is None or self.advsoft_stop_epoch >= 0, "train.advsoft_stop_epoch", "must be >= 0 or none")
        _check(self.input_noise_anneal in ("constant", "linear", "exponential"), "train.input_noise_anneal", f"unknown {self.input_noise_anneal!r}; choose constant, linear or exponential")
        _check(math.isfinite(self.input_noise_epochs) and self.input_noise_epochs > 0, "train.input_noise_epochs", f"{self.input_noise_epochs} must be finite and > 0")
        _check(self.checkpoint_interval >= 0, "train.checkpoint_interval", "must be >= 0")
        _check(math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1, "train.lr_decay", f"{self.lr_decay} must be in (0, 1]")
        _check(self.lr_decay_start >= 0, "train.lr_decay_start", f"{self.lr_decay_start} must be >= 0")
        _check(self.plateau_factor is None or (math.isfinite(self.plateau_factor) and 0 < self.plateau_factor < 1), "train.plateau_factor", f"{self.plateau_factor} must be in (0, 1) or none")
        _check(math.isfinite(self.aug_gamma) and self.aug_gamma >= 0, "train.aug_gamma", f"{self.aug_gamma} must be >= 0 (0 turns the augmented loss off)")
        _check(math.isfinite(self.aug_tau) and self.aug_tau > 0, "train.aug_tau", f"{self.aug_tau} must be > 0")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "train.device", f"unknown device {self.device!r}")


OBJECTIVES = ("lm", "discriminator", "reverse-kl")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What the run minimizes and which frozen models it reads (Popov & Kudinov 2019).

    ``lm``: the language-model loss (cross-entropy plus the configured terms), from scratch or,
    with ``base_model``, starting from that model's weights (cross-entropy fine-tuning).
    ``discriminator``: eq. (6) against the frozen ``base_model`` q0. ``reverse-kl``: eq. (12),
    starting from ``base_model`` (q0, kept frozen too) with the frozen ``discriminator``, or
    with r = 1/2 when it is none (the paper's "without discriminator").
    """

    kind: str = _f("lm", "lm (cross-entropy), discriminator (Popov & Kudinov eq. 6) or reverse-kl (fine-tuning, eq. 12)")
    base_model: str | None = _f(None, "model directory of the initial model q0 (discriminator and reverse-kl); for lm: start from its weights")
    discriminator: str | None = _f(None, "reverse-kl: model directory of the trained discriminator (none: r = 1/2, the 'without discriminator' ablation)")
    init_from_base: bool = _f(False, "discriminator: start from the base model's weights instead of a fresh initialization")

    def __post_init__(self) -> None:
        _check(self.kind in OBJECTIVES, "objective.kind", f"unknown {self.kind!r}; choose lm, discriminator or reverse-kl")
        _check(self.kind == "lm" or self.base_model is not None, "objective.base_model", f"objective {self.kind} needs the initial model q0; give its model directory")
        _check(self.discriminator is None or self.kind == "reverse-kl", "objective.discriminator", "is only read by objective.kind=reverse-kl; set it to none")
        _check(not self.init_from_base or self.kind == "discriminator", "objective.init_from_base", "is only read by objective.kind=discriminator")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    seed: int = _f(1111, "the one seed of the run (data order, dropout masks, BPTT lengths, initialization)")
    preset: str | None = _f(None, "the preset this run was built from (informational)")

    def __post_init__(self) -> None:
        _check_seed(self.seed, "seed")
        _check(
            self.train.aug_gamma == 0 or self.model.output == "softmax", "train.aug_gamma",
            f"the augmented loss reads the logits of a softmax output layer, which model.output={self.model.output} does not have; set train.aug_gamma=0",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "RunConfig":
        return _build(cls, raw, source)

    def replace(self, overrides: dict[str, Any]) -> "RunConfig":
        """A copy with nested overrides ``{"train": {"lr": 10}}`` applied."""
        return _build(RunConfig, _merge(self.to_dict(), overrides), "overrides")


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "objective": ObjectiveConfig}

ARCHITECTURE_FIELDS = ("encoder", "emb_size", "hidden_size", "last_hidden_size", "num_layers", "tie_weights", "output_bias", "output", "n_experts", "doc_experts")
"""The ModelConfig fields that define the network's shape; the rest (dropouts, AdvSoft, penalties) only change training."""


def architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``field: a vs b`` for every architecture field where the two configs differ."""
    return [f"{name}: {getattr(a, name)!r} vs {getattr(b, name)!r}" for name in ARCHITECTURE_FIELDS if getattr(a, name) != getattr(b, name)]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ReglmError:
                continue
        raise ReglmError(f"{where}: {value!r} is not a valid {tp}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ReglmError(f"{where}: {value!r} is not true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ReglmError(f"{where}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ReglmError(f"{where}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ReglmError(f"{where}: {value!r} is not a string")
    raise TypeError(f"unsupported config type {tp}")


def _build(cls: type, raw: Any, where: str, prefix: str = "") -> Any:
    if not isinstance(raw, dict):
        raise ReglmError(f"{where}: {prefix.rstrip('.') or 'the configuration'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ReglmError(f"{where}: unknown option(s) {', '.join(prefix + u for u in unknown)}; `reglm config` lists the options")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name], where, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(raw[f.name], tp, f"{where}: {prefix}{f.name}")
    return cls(**kwargs)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=10", "emb_size=400"]`` into ``{"train": {"lr": 10}, "model": {"emb_size": 400}}``."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ReglmError(f"override {item!r} is not key=value; write e.g. train.lr=10 (`reglm config` lists keys)")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, str) and value.lower() in ("none", "null"):
            value = None
        elif isinstance(value, str):
            value = _number(value)
        section, name = _resolve_key(key)
        if section is None:
            nested[name] = value
        else:
            nested.setdefault(section, {})[name] = value
    return nested


def _number(text: str) -> Any:
    """``text`` as a float when it is one YAML 1.1 leaves a string (``1e-9``, ``5E3``), else ``text``."""
    try:
        return float(text) if any(c.isdigit() for c in text) else text
    except ValueError:
        return text


def _resolve_key(key: str) -> tuple[str | None, str]:
    top = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS)
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise ReglmError(f"unknown override key {key!r}; `reglm config` lists the keys")
        return section, name
    if key in top:
        return None, key
    owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if not owners:
        raise ReglmError(f"unknown override key {key!r}; `reglm config` lists the keys")
    if len(owners) > 1:
        raise ReglmError(f"override key {key!r} is ambiguous; write one of {', '.join(o + '.' + key for o in owners)}")
    return owners[0], key


def describe_options() -> str:
    """One line per option: key, type, default, help."""
    lines = []
    for section, cls in [(None, RunConfig), *SECTIONS.items()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS:
                continue
            key = f"{section}.{f.name}" if section else f.name
            default = f.default if f.default is not dataclasses.MISSING else None
            type_name = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            lines.append(f"{key:28s} {type_name:12s} {default!r:12s} {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- presets

def _preset_dir() -> Path:
    return Path(str(resources.files("reglm") / "presets"))


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every bundled preset, sorted by name."""
    out = []
    for path in sorted(_preset_dir().glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        out.append((path.stem, str(raw.get("description", ""))))
    return out


def load_preset(name: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The overrides of a bundled preset (``name``) or of a YAML file (a path).

    A preset may start from another with ``extends: <preset>``: the parent's overrides are
    applied first, then the file's own (recursively; a cycle is an error).
    """
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = _preset_dir() / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(n for n, _ in list_presets())
        raise ReglmError(f"unknown preset {name!r}; choose one of: {known} (or give a path to a .yaml file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ReglmError(f"preset file {path} is not valid YAML ({exc}); fix the file") from None
    if not isinstance(raw, dict):
        raise ReglmError(f"preset file {path} must hold a mapping of sections")
    raw.pop("description", None)
    raw.pop("source", None)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ReglmError(f"preset file {path}: extends must name one preset, got {parent!r}")
    if parent in _chain or parent == name:
        raise ReglmError(f"preset file {path}: extends {parent!r} forms a cycle ({' -> '.join((*_chain, name, parent))})")
    return _merge(load_preset(parent, (*_chain, name)), raw)


def build_config(preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the preset, then ``key=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    if preset:
        raw = _merge(raw, load_preset(preset))
        raw["preset"] = preset
    if overrides:
        raw = _merge(raw, parse_overrides(overrides))
    return RunConfig.from_dict(raw, source=f"preset {preset}" if preset else "options")


def load_config_file(path: Path) -> RunConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReglmError(f"{path} is missing; is this a reglm run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReglmError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None
    return RunConfig.from_dict(raw, source=str(path))


def derive_config(base: RunConfig, preset: str | None, overrides: list[str], objective: dict[str, Any], what: str) -> RunConfig:
    """The configuration of a run that continues from a trained model (a discriminator, a
    fine-tuning): ``base``'s, then the preset's and the overrides' training options, then
    ``objective``. The architecture and the data must stay the base model's."""
    raw = base.to_dict()
    raw["preset"] = preset
    if preset:
        raw = _merge(raw, load_preset(preset))
    raw = _merge(raw, parse_overrides(overrides))
    raw["objective"] = objective
    config = RunConfig.from_dict(raw, source=f"preset {preset}" if preset else "options")
    diff = architecture_differences(base.model, config.model)
    if diff:
        raise ReglmError(f"{what} keeps the architecture of the model it starts from, but the options change {'; '.join(diff)}; drop those overrides")
    if config.data != base.data:
        raise ReglmError(f"{what} reads the data the model was trained on; drop the data.* overrides")
    return config
