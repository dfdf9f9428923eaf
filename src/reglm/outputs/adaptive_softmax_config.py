"""The configuration of the adaptive softmax (:mod:`reglm.outputs.adaptive_softmax`, where its
bands, dropouts and weight sharing are described) and its checks against the input layer it
may tie to."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from reglm.config.fields import ComponentConfig, check, check_kind, check_prob, kind_field, option
from reglm.config.kinds import component_class
from reglm.inputs.adaptive_input import band_dims, parse_cutoffs
from reglm.outputs.adversarial import AdvSoftConfig

TIES = ("none", "embeddings", "projections", "head")


@dataclass(frozen=True)
class AdaptiveSoftmaxConfig(ComponentConfig):
    """An adaptive softmax: a head over frequent words and clusters, tails of decreasing dimension."""

    kind: str = kind_field("adaptive", "adaptive softmax, Grave et al. 2017")
    cutoffs: str = option(
        "20000,60000",
        "comma-separated first ids of the tail clusters, e.g. 20000,60000; every cutoff < the vocabulary size",
        arch=True,
    )
    factor: float = option(
        4.0, "k: cluster i has dimension d / k^(i-1), d the encoder output size (torch's div_value)", arch=True
    )
    tail_dropout: float = option(
        0.0, "dropout on each tail cluster's projected input (Baevski & Auli 5.4: 0.2 on WikiText-103)"
    )
    softmax_input_dropout: float = option(
        0.0,
        "dropout on the layer's input, before the head and the tail projections read it "
        "(the authors' code: the tail dropout's rate, 0.2 on WikiText-103)",
    )
    tie: str | None = option(
        "projections",
        "share with an adaptive input (Table 7): none, embeddings (word embeddings), projections (also the tail "
        "projections; the paper's best), head (also a head projection); with a word-embedding input only "
        "embeddings, at factor 1",
        arch=True,
    )
    advsoft: AdvSoftConfig = option(
        AdvSoftConfig(),
        "the adversarial softmax, in the head and in the target's cluster",
    )

    def __post_init__(self) -> None:
        check(
            math.isfinite(self.factor) and self.factor >= 1,
            "model.output.factor",
            f"{self.factor} must be finite and >= 1",
        )
        check_prob(self.tail_dropout, "model.output.tail_dropout")
        check_prob(self.softmax_input_dropout, "model.output.softmax_input_dropout")
        if self.tie is None:  # `tie=none` on the command line reads as None
            object.__setattr__(self, "tie", "none")
        check_kind(self.tie, TIES, "model.output.tie")
        parse_cutoffs(self.cutoffs, "model.output.cutoffs")

    @property
    def cutoff_values(self) -> tuple[int, ...]:
        return parse_cutoffs(self.cutoffs, "model.output.cutoffs")

    def check_with(self, model: Any) -> None:
        """The cluster dimensions divide the encoder output size; tying needs an adaptive input
        of the same bands, factor and size, or a word embedding of that size at factor 1."""
        features = model.encoder.output_size(model.input.output_size)
        band_dims(features, self.factor, len(self.cutoff_values) + 1, "model.output.factor")
        if self.tie == "none":
            return
        inp = model.input
        capabilities = component_class("input", inp).capabilities
        if "word-matrix" in capabilities:
            check(
                self.tie == "embeddings",
                "model.output.tie",
                f"tie={self.tie} shares parameters with an adaptive input, not with input layer embedding; set "
                "model.input=adaptive, "
                "model.output.tie=none, or tie=embeddings with factor=1",
            )
            check(
                self.factor == 1,
                "model.output.factor",
                f"{self.factor:g}: a word embedding has one size for every word, so tying the "
                "adaptive softmax to it needs factor=1 (no dim reduction); set factor=1 or model.output.tie=none",
            )
            check(
                features == inp.output_size,
                "model.output.tie",
                f"the adaptive softmax reads the encoder output ({features} features from encoder "
                f"{model.encoder.kind}) but ties to a "
                f"word embedding of size {inp.output_size}; make them equal (model.encoder.output_dim) or set tie=none",
            )
            return
        check(
            "bands" in capabilities,
            "model.output.tie",
            f"tie={self.tie} shares parameters with an adaptive input, not with input layer {inp.kind}; set "
            "model.input=adaptive or model.output.tie=none",
        )
        check(
            inp.cutoff_values == self.cutoff_values,
            "model.output.cutoffs",
            f"{self.cutoffs!r} differs from model.input.cutoffs {inp.cutoffs!r}; tied bands must be the same (or "
            "set model.output.tie=none)",
        )
        check(
            inp.factor == self.factor,
            "model.output.factor",
            f"{self.factor:g} differs from model.input.factor {inp.factor:g}; tied bands must have the same "
            "dimensions (or set model.output.tie=none)",
        )
        check(
            features == inp.dim,
            "model.output.tie",
            f"the adaptive softmax reads the encoder output ({features} features from encoder "
            f"{model.encoder.kind}) but ties to "
            f"bands of an adaptive input of dim {inp.dim}; make them equal (model.encoder.last_hidden_size or "
            "hidden_size) or set tie=none",
        )
