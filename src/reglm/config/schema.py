"""The run configuration: frozen dataclasses, one per stage, with components chosen by kind.

``RunConfig`` = ``data`` + ``model`` (``input``, ``encoder``, ``output`` components) + ``train``
(with ``optimizer``, ``averaging``, ``schedule`` components) + ``objective`` + ``seed``. Each
component's dataclass lives next to the component (``reglm.encoders.awd_lstm.AWDLSTMConfig``...)
and is chosen by the ``kind`` of its mapping among its family's registry
(:data:`reglm.config.kinds.FAMILIES`). Every field carries a one-line help text; ``reglm config``
prints them all. A run directory stores the whole configuration as ``config.json``, and every
checkpoint again, so a model can always be rebuilt from what is on disk. Checks that span
several stages are in one place, :meth:`RunConfig.__post_init__`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from reglm.config.aliases import ALIASES, OLD_AVERAGING
from reglm.config.build import apply, build, component, kinds_first, nested_assignments
from reglm.config.fields import check, check_seed, option
from reglm.config.kinds import family_configs
from reglm.config.train import TrainConfig

TOKENIZERS = ("word", "bpe")
MIN_BPE_VOCAB = 16
"""Smallest ``data.bpe_vocab_size``: room for ``<unk>``, ``<eos>`` and a few characters (the
learnt vocabulary always holds every training character, whatever the setting)."""


@dataclass(frozen=True)
class DataConfig:
    """Which corpus to read and how to build its vocabulary."""

    name: str = option(
        "synthetic",
        "ptb, wikitext-2, wikitext-103, lm1b, synthetic, or a directory holding train.txt/valid.txt/test.txt",
    )
    data_dir: str | None = option(
        None, "download cache for built-in corpora (default: $REGLM_DATA_DIR or ~/.cache/reglm)"
    )
    min_freq: int = option(1, "training words seen fewer times become <unk>")
    max_vocab: int | None = option(None, "keep only the most frequent training words (<unk> and <eos> included)")
    synthetic_seed: int = option(0, "seed of the synthetic trigram language (its table and its samples)")
    synthetic_sentences: int = option(
        80000, "synthetic corpus: training sentences; valid and test get one eighth each (80k/10k/10k)"
    )
    synthetic_rule: str = option(
        "stream",
        "synthetic corpus: stream (sentences are pieces of one trigram text, an xi per beta factor: the "
        "paper's statistics) or restart (every sentence starts afresh, one xi per triple: the reading of "
        "runs whose config.json lacks this option)",
    )
    tokenizer: str = option(
        "word",
        "word (one unit per whitespace word) or bpe (sub-word units learnt on train.txt, Baevski & Auli 4.4; "
        "perplexity stays word-level)",
    )
    bpe_vocab_size: int = option(
        32000,
        "bpe: units in all (characters, merged units, <unk>, <eos>), so about merges + alphabet; the paper's 32K "
        "codes (merges) gave 33,337 units on WikiText-103",
    )
    train_parts: int = option(
        1,
        "train on one of this many parts of the training split (whole lines, about equal token counts; Inan et al. "
        "Table 2: 2); the vocabulary stays the whole training split's",
    )
    train_part: int = option(1, "which part (1-based) of data.train_parts the run trains on")

    def __post_init__(self) -> None:
        check(self.min_freq >= 1, "data.min_freq", f"{self.min_freq} must be >= 1")
        check(self.max_vocab is None or self.max_vocab >= 3, "data.max_vocab", f"{self.max_vocab} must be >= 3 or none")
        check(self.synthetic_sentences >= 8, "data.synthetic_sentences", f"{self.synthetic_sentences} must be >= 8")
        check_seed(self.synthetic_seed, "data.synthetic_seed")
        from reglm.data.synthetic import RULES

        check(
            self.synthetic_rule in RULES,
            "data.synthetic_rule",
            f"unknown {self.synthetic_rule!r}; choose {' or '.join(RULES)}",
        )
        check(
            self.tokenizer in TOKENIZERS,
            "data.tokenizer",
            f"unknown {self.tokenizer!r}; choose {' or '.join(TOKENIZERS)}",
        )
        check(
            self.bpe_vocab_size >= MIN_BPE_VOCAB,
            "data.bpe_vocab_size",
            f"{self.bpe_vocab_size} must be >= {MIN_BPE_VOCAB}",
        )
        check(self.train_parts >= 1, "data.train_parts", f"{self.train_parts} must be >= 1")
        check(
            1 <= self.train_part <= self.train_parts,
            "data.train_part",
            f"{self.train_part} must be between 1 and data.train_parts={self.train_parts}",
        )
        if self.tokenizer == "bpe":
            check(
                self.min_freq == 1 and self.max_vocab is None,
                "data.tokenizer",
                "bpe has no word vocabulary to cut: leave data.min_freq=1 and data.max_vocab=none, and size the "
                "units with data.bpe_vocab_size",
            )
            check(
                self.name != "synthetic",
                "data.tokenizer",
                "the synthetic corpus is word-level (its true probabilities are per word); use tokenizer=word, or "
                "bpe with a natural-text corpus",
            )


@dataclass(frozen=True)
class ModelConfig:
    """The language model: input layer -> encoder -> output layer, each a component chosen by kind."""

    input: Any = component("input", "embedding", "input layer")
    encoder: Any = component("encoder", "awd-lstm", "encoder")
    output: Any = component("output", "softmax", "output layer")

    def __post_init__(self) -> None:
        """The checks across components: each component config's ``check_with(model_config)``
        (:class:`~reglm.config.fields.ComponentConfig`: does it fit the other two)."""
        for part in (self.input, self.encoder, self.output):
            part.check_with(self)

    @classmethod
    def build(cls, **options: Any) -> ModelConfig:
        """A model config from ``option=value`` pairs of the ``model`` section, by full path
        (``encoder__hidden_size`` for ``encoder.hidden_size``), old flat name or unique name:
        ``ModelConfig.build(emb_size=16, hidden_size=24, input_dropout=0.2)``."""
        raw = apply(
            {},
            RunConfig,
            kinds_first([(f"model.{key.replace('__', '.')}", value) for key, value in options.items()], RunConfig),
        )
        return RunConfig.from_dict(raw, "ModelConfig.build").model


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: Any = component("objective", "lm", "what the run minimizes")
    seed: int = option(1111, "the one seed of the run (data order, dropout masks, BPTT lengths, initialization)")
    preset: str | None = option(None, "the preset this run was built from (informational)")

    def __post_init__(self) -> None:
        """The checks that span stages: what the objective terms need of the output layer, and what
        the objective needs of the run (its config's ``check_with``)."""
        from reglm.config.kinds import component_class
        from reglm.outputs.base import require

        check_seed(self.seed, "seed")
        output = component_class("output", self.model.output, "model.output")
        if self.train.terms.aug_gamma > 0:
            require(
                output,
                "softmax-logits",
                "train.terms.aug_gamma",
                "the augmented loss divides the output layer's logits by a temperature",
            )
            check(
                "word-matrix" in component_class("input", self.model.input, "model.input").capabilities,
                "train.terms.aug_gamma",
                f"the augmented loss reads the word embedding matrix, which input layer {self.model.input.kind} "
                "does not have; set model.input=embedding or aug_gamma=0",
            )
        advsoft = self.model.output.advsoft
        if advsoft is not None and advsoft.enabled:
            require(output, "advsoft", "model.output.advsoft", "the adversarial softmax perturbs target logits")
        self.objective.check_with(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        """A config from its nested mapping (``to_dict()``, or a ``config.json`` of any reglm
        version: the layout before components is migrated on read, and a synthetic corpus named
        without ``synthetic_rule``, written before that option existed, gets the rule of that
        time, ``restart``)."""
        if is_flat_layout(raw):
            raw = migrate(raw)
        elif has_old_names(raw):
            raw = regroup(raw)
        data = raw.get("data")
        if isinstance(data, dict) and "synthetic_rule" not in data and data.get("name", "synthetic") == "synthetic":
            raw = {**raw, "data": {**data, "synthetic_rule": "restart"}}
        return build(cls, raw, source)

    def replace(self, overrides: dict[str, Any]) -> RunConfig:
        """A copy with nested overrides ``{"train": {"optimizer": {"lr": 10}}}`` applied."""
        raw = apply(self.to_dict(), RunConfig, nested_assignments(overrides))
        return build(RunConfig, raw, "overrides")


def is_flat_layout(raw: dict[str, Any]) -> bool:
    """Whether ``raw`` is a config of the layout before components (``model.emb_size``...)."""
    model, train = raw.get("model"), raw.get("train")
    return (isinstance(model, dict) and (isinstance(model.get("encoder"), str) or "emb_size" in model)) or (
        isinstance(train, dict) and "lr" in train
    )


def migrate(raw: dict[str, Any]) -> dict[str, Any]:
    """A config of the layout before components -> the component layout: every flat option to
    its new path (:data:`~reglm.config.aliases.ALIASES`), ``train.optimizer=ntasgd|sgd`` to the
    averaging policy it named, and options the chosen kinds do not have (a flat config listed
    every option, the mixture's too) dropped."""
    raw = json.loads(json.dumps(raw))
    model = raw.pop("model", {}) or {}
    train = raw.pop("train", {}) or {}
    new: dict[str, Any] = {}
    first = [("model.encoder", model.pop("encoder", "awd-lstm")), ("model.output", model.pop("output", "softmax"))]
    averaging = train.pop("optimizer", "ntasgd")
    first.append(("train.averaging", OLD_AVERAGING.get(averaging, averaging)))
    apply(new, RunConfig, first)
    rest = [(f"model.{key}", value) for key, value in model.items()] + [
        (f"train.{key}", value) for key, value in train.items()
    ]
    rest += [(key, value) for key, value in nested_assignments(raw)]
    return apply(new, RunConfig, kinds_first(rest, RunConfig), lenient=True)


OLD_OBJECTIVE_OPTIONS = frozenset({"base_model", "discriminator", "init_from_base"})
"""The options every objective listed before the objectives were a family (each read by some kinds)."""


def has_old_names(raw: dict[str, Any]) -> bool:
    """Whether ``raw`` (of the component layout) names options of ``train`` or ``objective`` as
    they were before those had their own components and sections (``train.bptt``, an ``lm``
    objective with ``discriminator: null``)."""
    train, objective = raw.get("train"), raw.get("objective")
    if isinstance(train, dict) and any(
        f"train.{key}" in ALIASES and not isinstance(value, dict) for key, value in train.items()
    ):
        return True
    if not isinstance(objective, dict):
        return False
    config = family_configs("objective").get(objective.get("kind", "lm"))
    own = {f.name for f in dataclasses.fields(config)} if config is not None else set(objective)
    return bool((set(objective) - own) & OLD_OBJECTIVE_OPTIONS)


def regroup(raw: dict[str, Any]) -> dict[str, Any]:
    """A config of the component layout with the older flat ``train`` / ``objective`` options ->
    today's: every option to its path (:data:`~reglm.config.aliases.ALIASES`), the kinds first,
    and the options the chosen kinds do not have (the old file listed every one) dropped."""
    return apply({}, RunConfig, kinds_first(nested_assignments(raw), RunConfig), lenient=True)


ARCH = "arch"
"""Field metadata that marks an option defining the network's shape (the rest only changes training)."""


def architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``option: a vs b`` for every shape-defining option (and every component kind) where two
    model configs differ."""
    out = []
    for name in ("input", "encoder", "output"):
        ca, cb = getattr(a, name), getattr(b, name)
        if ca.kind != cb.kind:
            out.append(f"model.{name}.kind: {ca.kind!r} vs {cb.kind!r}")
            continue
        for f in dataclasses.fields(ca):
            if f.metadata.get(ARCH) and getattr(ca, f.name) != getattr(cb, f.name):
                out.append(f"model.{name}.{f.name}: {getattr(ca, f.name)!r} vs {getattr(cb, f.name)!r}")
    return out
