"""``reglm params``: parameter counts of the adaptive-input paper's configurations, built on the
meta device. The integers are this implementation's; docs/adaptive-input.md compares them with
the paper's Tables 3 and 4 (every one within 0.07%)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reglm.cli import main

WIKITEXT_103 = {
    "transformer-wt103-sm": 476_750_848,
    "transformer-wt103-sm-t": 339_670_528,
    "transformer-wt103-bpe": 269_815_808,
    "transformer-wt103-bpe-t": 235_678_720,
    "transformer-wt103-asm": 263_086_976,
    "transformer-wt103-cnn": 266_343_232,
    "transformer-wt103-adp": 291_277_696,
    "transformer-wt103-adp-t": 246_934_976,
}
"""Table 3 at the published vocabulary (267,735 words; BPE: 33,337 units)"""

TABLE_7 = {
    "transformer-wt103-asm-emb256": 314_688_704,
    "transformer-wt103-asm-emb128": 280_287_552,
    "transformer-wt103-asm-emb32": 254_486_688,
    "transformer-wt103-sm-t-emb256": 270_606_080,
    "transformer-wt103-sm-emb256": 339_146_240,
    "transformer-wt103-sm-emb64": 356_346_816,
    "transformer-wt103-adp-t-emb": 247_262_656,
    "transformer-wt103-adp-t-head": 246_934_976,
    "transformer-wt103-asm-t-nodim": 340_195_840,
}
"""Table 7's other rows (314.7M, 280.3M, 254.5M, 270.6M, 339.1M, 356.3M, 247.3M, 246.9M, 340.2M)"""

BILLION_WORD = {
    "transformer-gbw-adp-t": 330_829_760,
    "transformer-gbw-adp": 458_411_904,
    "transformer-gbw-cnn": 365_775_680,
    "transformer-gbw-asm": 532_844_224,
}
"""Table 4 at the billion-word vocabulary of 793,471 words"""


def _params(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["params", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("preset", sorted(WIKITEXT_103))
def test_wikitext103_table3_counts(capsys: pytest.CaptureFixture[str], preset: str) -> None:
    got = _params(capsys, "--preset", preset)
    assert got["total"] == WIKITEXT_103[preset]
    assert got["input"] + got["body"] + got["output"] == got["total"]


@pytest.mark.parametrize("preset", sorted(TABLE_7))
def test_wikitext103_table7_counts(capsys: pytest.CaptureFixture[str], preset: str) -> None:
    assert _params(capsys, "--preset", preset)["total"] == TABLE_7[preset]


@pytest.mark.parametrize("preset", sorted(BILLION_WORD))
def test_billion_word_table4_counts(capsys: pytest.CaptureFixture[str], preset: str) -> None:
    assert _params(capsys, "--preset", preset, "--vocab-size", "793471")["total"] == BILLION_WORD[preset]


def test_the_split_names_where_parameters_live(capsys: pytest.CaptureFixture[str]) -> None:
    """ADP-T ties everything but the head's projection: the output layer owns only the cluster
    entries (2 x 1024). SM's embedding and untied softmax own V x 512 each; its body is ADP-T's
    plus the bias-free projections 512 -> 1024 at the input and 1024 -> 512 at the output."""
    adp_t = _params(capsys, "--preset", "transformer-wt103-adp-t")
    assert adp_t["output"] == 2 * 1024
    sm = _params(capsys, "--preset", "transformer-wt103-sm")
    assert sm["output"] == 267_735 * 512 and sm["input"] == 267_735 * 512
    assert sm["body"] == adp_t["body"] + 2 * 512 * 1024


def test_overrides_and_a_human_table(capsys: pytest.CaptureFixture[str]) -> None:
    small = _params(capsys, "--preset", "transformer-wt103-adp-t", "--vocab-size", "100000", "model.encoder.layers=2")
    full = _params(capsys, "--preset", "transformer-wt103-adp-t", "--vocab-size", "100000")
    per_block = 4 * 1024 * 1024 + 4 * 1024 + 2 * 1024 * 4096 + 4096 + 1024 + 2 * 2 * 1024
    assert full["body"] - small["body"] == 14 * per_block
    assert main(["params", "--preset", "transformer-wt103-adp-t"]) == 0
    out = capsys.readouterr().out
    assert "267,735" in out and "246.9M" in out


def test_a_corpus_without_a_known_vocabulary_needs_vocab_size(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["params", "--preset", "transformer-gbw-adp-t"]) == 0
    assert "793,471 (the published lm1b vocabulary)" in capsys.readouterr().out
    assert main(["params", "--preset", "tiny", f"data.name={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "--vocab-size" in err and "Traceback" not in err
    assert main(["params", "--preset", "transformer-wt103-adp-t", "--vocab-size", "1"]) == 2
