"""The one perplexity formula (a sum of negative log-probabilities in nats or log10 units over a
token count) and the reading of a split, of an explicit kind."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from reglm.data.sentence_plan import SentencePlan
from reglm.data.windows import ContextPlan, StreamPlan
from reglm.evaluate.perplexity import Reading, ReadingKind, perplexity_of


def test_a_sum_in_nats_and_the_same_sum_in_log10_units_give_one_perplexity() -> None:
    nll = 23.75
    assert perplexity_of(nll, 7) == pytest.approx(math.exp(nll / 7), rel=1e-15)
    assert perplexity_of(nll / math.log(10.0), 7, "10") == pytest.approx(math.exp(nll / 7), rel=1e-12)


def test_no_tokens_is_nan_and_an_overflow_is_inf() -> None:
    assert math.isnan(perplexity_of(0.0, 0))
    assert perplexity_of(1e6, 1) == math.inf
    assert math.isnan(perplexity_of(math.nan, 3))


def test_each_reading_has_its_kind_plan_and_report() -> None:
    ids = torch.tensor([0, 5, 6, 0, 7, 8, 9, 0, 4, 0])
    cases = [
        (Reading.streams(2, 3), ReadingKind.STREAMS, StreamPlan, {"kind": "streams", "bptt": 3}),
        (
            Reading.blocks(2, 4, 1, 0),
            ReadingKind.BLOCKS,
            ContextPlan,
            {"kind": "blocks", "block": 4, "context": 1, "whole_sentences": True},
        ),
        (Reading.sentences(8, 0), ReadingKind.SENTENCES, SentencePlan, {"kind": "sentences", "max_tokens": 8}),
    ]
    for reading, kind, plan, report in cases:
        assert reading.kind is kind and isinstance(reading.plan(ids), plan) and reading.report() == report
    # the flat settings of a run's config decode to the same kinds; replace() keeps the kind
    assert Reading(2, 35, block=4, context=1, sentence_end=0) == cases[1][0]
    assert dataclasses.replace(cases[2][0], batch_size=5).kind is ReadingKind.SENTENCES


def test_settings_that_are_no_kind_are_refused() -> None:
    with pytest.raises(ValueError, match="sentence_end"):
        Reading(1, max_tokens=8)
    with pytest.raises(ValueError, match="no block"):
        Reading(1, block=4, sentence_end=0, max_tokens=8)
