"""The papers' table rows as preset metadata (reglm.config.presets, reglm.papers) and the plan
`reglm reproduce` makes of them (reglm.reproduce): every row has a preset that builds, states
the paper's numbers as the paper prints them, and matches the paper's parameter count."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import pytest
import torch

from reglm.config import ModelConfig, architecture_differences, build_config
from reglm.config.presets import metadata_of, preset_metadata, table_rows
from reglm.data import load_corpus
from reglm.errors import ReglmError
from reglm.models import LanguageModel
from reglm.optim.schedules import DecaySchedule, DecayScheduleConfig
from reglm.papers import PAPERS
from reglm.reproduce import Budget, Planner, select_rows
from tests.conftest import REPO

PAPER_TEXTS = REPO.parent / "shared" / "papers"
VOCAB = {
    "ptb": 10_000,
    "wikitext-2": 33_278,
    "wikitext-103": 267_735,
    "billion-word": 793_471,
    "lm1b": 793_471,
    "synthetic": 1001,
}
"""the vocabularies the papers count with (billion word: the published 793,471 words)"""
ROWS = table_rows()


def test_every_listed_row_has_a_preset_and_every_row_is_listed() -> None:
    claimed = {(row.paper, row.table, row.id) for row in ROWS}
    listed = {
        (paper, table, row) for paper, entry in PAPERS.items() for table, t in entry.tables.items() for row in t.rows
    }
    assert claimed == listed
    for paper, entry in PAPERS.items():
        for table, t in entry.tables.items():
            kinds = [bool(t.rows), bool(t.missing), bool(t.study)]
            assert kinds.count(True) == 1, f"{paper}:{table} lists rows, names what it lacks or its study"


@functools.cache
def _count(preset: str) -> int:
    """The parameters of ``preset``'s model for its corpus's vocabulary, built on the meta device
    (once per distinct model)."""
    config = build_config(preset)
    return _meta_count(
        config.model, config.data.bpe_vocab_size if config.data.tokenizer == "bpe" else VOCAB[config.data.name]
    )


@functools.cache
def _meta_count(model: ModelConfig, vocab_size: int) -> int:
    with torch.device("meta"):
        return LanguageModel(model, vocab_size).num_parameters()


def test_every_row_preset_builds_on_the_meta_device_with_the_stated_parameter_count() -> None:
    """A stated count matches within 1% of the printed figure, or the printed figure is the count
    cut to its last digit (Merity et al. print 33,556,078 as 33M)."""
    checked = 0
    for row in ROWS:
        count = _count(row.preset)
        stated, unit = row.reported.params_count, row.reported.params_unit
        if stated is not None:
            assert abs(count - stated) <= 0.01 * stated or count // unit * unit == stated, (
                row.key,
                row.id,
                count,
                stated,
            )
            checked += 1
    assert checked == 7 + 34 and _count("awd-lstm-ptb") == 24_221_600 and _count("vd-lstm-ptb-large-real") == 51_024_000


@pytest.mark.skipif(not PAPER_TEXTS.is_dir(), reason="the papers' texts (../shared/papers) are absent")
def test_reported_numbers_are_printed_in_the_papers() -> None:
    texts = {
        name: (PAPER_TEXTS / paper.text).read_text(encoding="utf-8") for name, paper in PAPERS.items() if paper.text
    }
    for row in ROWS:
        for value in (row.reported.valid, row.reported.test):
            if value is not None:
                forms = {f"{value:.1f}", f"{value:.2f}", repr(value)}
                assert any(re.search(rf"(?<![\d.]){re.escape(form)}(?![\d])", texts[row.paper]) for form in forms), (
                    row.key,
                    row.id,
                    value,
                )
        if row.reported.params is not None:
            assert row.reported.params in texts[row.paper], (row.key, row.id, row.reported.params)
        for listing in row.reported.top10 or ():
            for word, prob in (item.rsplit(" ", 1) for item in listing.split(", ")):
                assert f"{word if word != '<unk>' else 'hunki'} {prob}" in texts[row.paper].replace(
                    "in0.03", "in 0.03"
                ).replace("\u2019", "'"), (row.id, word, prob)


def test_evaluation_specs_parse() -> None:
    from reglm.evaluate.cache import parse_cache_spec
    from reglm.evaluate.dynamic_spec import parse_dynamic_grid

    for row in ROWS:
        if row.evaluation == "cache":
            assert str(parse_cache_spec(row.spec or "")).startswith("window=")
        if row.evaluation == "dynamic-search":
            assert len(parse_dynamic_grid(row.spec or "")) > 1


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"paper": {"name": "nobody", "table": "1", "id": "a", "row": "A"}}, "paper.name 'nobody' is unknown"),
        ({"paper": {"name": "inan", "table": "9", "id": "a", "row": "A"}}, "inan has no such table"),
        ({"paper": {"name": "inan", "table": "1", "id": "A b", "row": "A"}}, "lower-case"),
        ({"paper": {"name": "inan", "table": "1", "row": "A"}}, "has no 'id'"),
        (
            {"paper": {"name": "inan", "table": "1", "id": "a", "row": "A", "reported": {"valid": 0.5}}},
            "reported.valid must be a perplexity",
        ),
        (
            {"paper": {"name": "inan", "table": "1", "id": "a", "row": "A", "reported": {"params": "24 million"}}},
            "like 24M",
        ),
        ({"paper": {"name": "inan", "table": "1", "id": "a", "row": "A", "reported": {"ppl": 5}}}, "unknown key"),
        (
            {"paper": {"name": "inan", "table": "1", "id": "a", "row": "A", "evaluation": "beam"}},
            "evaluation 'beam' is unknown",
        ),
        (
            {"paper": {"name": "inan", "table": "1", "id": "a", "row": "A", "spec": "window=1"}},
            "spec is read by a cache or dynamic",
        ),
        (
            {"paper": {"name": "inan", "table": "1", "id": "a", "row": "A", "evaluation": "cache", "stage": "main"}},
            "stage main is read by plain",
        ),
        (
            {"starts_from": {"run": "tiny", "objective": "lm", "discriminator": "tiny"}},
            "discriminator is read by objective reverse-kl",
        ),
        ({"starts_from": {"run": "no-such-preset", "objective": "lm"}}, "no bundled preset"),
    ],
)
def test_malformed_metadata_names_the_preset_and_the_key(raw: dict, fragment: str) -> None:
    with pytest.raises(ReglmError, match=re.escape(fragment)) as info:
        metadata_of("mine", raw)
    assert "preset mine" in str(info.value)


def test_params_as_printed() -> None:
    row = metadata_of(
        "mine", {"paper": {"name": "inan", "table": "3", "id": "a", "row": "A", "reported": {"params": "2.51B"}}}
    ).rows[0]
    assert (row.reported.params_count, row.reported.params_unit) == (2_510_000_000, 10**7)


def test_training_half_keeps_the_whole_vocabulary() -> None:
    options = ["data.name=synthetic", "data.synthetic_sentences=100"]
    whole = load_corpus(build_config(None, options))
    halves = [
        load_corpus(build_config(None, [*options, "data.train_parts=2", f"data.train_part={part}"])) for part in (1, 2)
    ]
    eos = whole.vocab.eos_id
    assert all(half.vocab.fingerprint() == whole.vocab.fingerprint() for half in halves)
    assert torch.equal(torch.cat([half.train for half in halves]), whole.train)
    assert (
        all(int(half.train[-1]) == eos for half in halves)
        and abs(halves[0].train.numel() - halves[1].train.numel()) <= 2 * 11
    )
    assert all(torch.equal(half.valid, whole.valid) and torch.equal(half.test, whole.test) for half in halves)
    assert build_config("vd-lstm-wt2-small-re-part2").data.train_part == 2
    with pytest.raises(ReglmError, match="data.train_part"):
        build_config(None, ["data.train_parts=2", "data.train_part=3"])


def test_nonmono_halving_fires_on_the_reference_criterion_and_resumes() -> None:
    """AWD-LSTM Table 4 '- NT-ASGD': the rate halves at each epoch whose validation score is worse
    than the best one older than n epochs (n = 2 here), and never otherwise."""
    cfg = DecayScheduleConfig(nonmono_factor=0.5, nonmono_interval=2)
    schedule = DecaySchedule(cfg, lr=30.0, finetune_lr=None)
    scores = [5.0, 4.0, 3.0, 3.5, 3.6, 3.4, 2.9, 3.1, 3.2, 3.3]
    fired = [schedule.epoch_end(i == 0 or s < min(scores[:i]), s) for i, s in enumerate(scores)]
    # epoch t fires when t > 2 and s > min(scores[:t-2]): 3.4 (> 3.0), 3.1 (> 3.0), 3.2 (> 3.0), 3.3 (> 2.9)
    assert fired == [False, False, False, False, False, True, False, True, True, True]
    assert schedule.rate("main", 9, 0) == pytest.approx(30.0 / 16)
    copy = DecaySchedule(cfg, lr=30.0, finetune_lr=None)
    copy.load_state_dict(schedule.state_dict())
    assert copy.epoch_end(False, 3.25) and copy.scale == pytest.approx(schedule.scale / 2)
    plateau = DecaySchedule(DecayScheduleConfig(plateau_factor=0.1), lr=1.0, finetune_lr=None)
    assert [plateau.epoch_end(improved, 1.0) for improved in (True, False)] == [False, True] and math.isclose(
        plateau.scale, 0.1
    )
    assert build_config("awd-lstm-ptb-no-ntasgd").train.schedule.nonmono_factor == 0.5


def test_the_plan_shares_runs_and_orders_derived_runs(tmp_path: Path) -> None:
    planner = Planner(tmp_path, "reduced", Budget(epochs=2), [])
    plans = {plan.row.id: plan for plan in planner.plan(table_rows("merity", "4")[:3])}
    assert plans["ptb-no-finetune"].run is plans["ptb-awd-lstm"].run and plans["ptb-no-finetune"].stage == "main"
    assert plans["ptb-awd-lstm"].run.name == "awd-lstm-ptb" and plans["ptb-awd-lstm"].full_params == 24_221_600
    assert (
        plans["ptb-awd-lstm"].run.config.model.encoder.hidden_size == 288
        and plans["ptb-awd-lstm"].run.config.train.epochs == 2
    )
    assert (
        Planner(tmp_path, "full", Budget(), []).plan(select_rows("merity", "1", ["awd-lstm-cache"]))[0].run.name
        == "awd-lstm-ptb"
    )
    planner = Planner(tmp_path, "reduced", Budget(), [])
    plan = planner.plan(select_rows("popov", "2", ["no-dropout-disc"]))[0]
    assert [run.name for run in planner.runs] == [
        "doc-awd-lstm-ptb",
        "doc-awd-lstm-ptb-discriminator",
        "doc-awd-lstm-ptb-dfinetune",
    ]
    objective = plan.run.config.objective
    assert (objective.kind, objective.base_model, objective.discriminator) == (
        "reverse-kl",
        str(tmp_path / "runs" / "doc-awd-lstm-ptb" / "best"),
        str(tmp_path / "runs" / "doc-awd-lstm-ptb-discriminator" / "best"),
    )
    assert (
        not architecture_differences(planner.runs[0].config.model, plan.run.config.model)
        and plan.run.config.train.epochs == 2
    )  # dfinetune's 15 / 10
    assert plan.run.config.model.encoder.hidden_size == 240 and plan.run.config.model.encoder.weight_dropout == 0
    assert preset_metadata("doc-awd-lstm-ptb").rows[0].reported.valid == 54.31


def test_rows_by_id_or_group_and_refusals() -> None:
    assert [row.id for row in select_rows("inan", "1", ["ptb-small"])] == [
        "ptb-small-vd",
        "ptb-small-al",
        "ptb-small-re",
        "ptb-small-real",
    ]
    assert [row.id for row in select_rows("inan", "1", ["ptb-small-re"])] == ["ptb-small-re"]
    with pytest.raises(ReglmError, match="has no row 'ptb-tiny'"):
        select_rows("inan", "1", ["ptb-tiny"])
    with pytest.raises(ReglmError, match="reglm study trigram"):
        select_rows("popov", "1", None)
