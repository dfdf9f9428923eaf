"""``reglm eval --context-window C --block L`` on a trained tiny Transformer (Baevski & Auli, Table 5)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from reglm.cli import main
from reglm.config import build_config
from reglm.data import load_corpus
from reglm.train.run import train


@pytest.fixture(scope="module")
def transformer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ctx") / "run"
    train(build_config("transformer-tiny", ["train.epochs=1"]), run, progress=False)
    return run


def _eval(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_context_zero_equals_plain_block_evaluation(transformer_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = _eval(capsys, str(transformer_run))
    assert plain["reading"] == {"kind": "blocks", "block": 16, "context": 0, "whole_sentences": True}
    zero = _eval(capsys, str(transformer_run), "--context-window", "0", "--block", "16")
    assert zero["loss"] == plain["loss"] and zero["tokens"] == plain["tokens"]


def test_every_token_is_scored_once_with_context(
    transformer_run: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    valid = load_corpus(build_config("transformer-tiny")).valid
    probs = tmp_path / "probs.tsv"
    result = _eval(capsys, str(transformer_run), "--context-window", "8", "--block", "16", "--word-probs", str(probs))
    assert result["tokens"] == valid.numel() - 1
    assert result["reading"]["context"] == 8
    with probs.open() as f:
        positions = [int(row["position"]) for row in csv.DictReader(f, delimiter="\t")]
    assert positions == list(range(valid.numel())), "every token once in stream order, the first scored after <eos>"
    plain = _eval(capsys, str(transformer_run), "--block", "16")
    assert result["loss"] != plain["loss"], "the context must change what the model sees"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--context-window", "16", "--block", "16"], "must be smaller than the block"),
        (["--context-window", "-1", "--block", "16"], "--context-window"),
        (["--context-window", "x"], "--context-window"),
    ],
)
def test_bad_context_windows_are_clear_errors(
    transformer_run: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    assert main(["eval", str(transformer_run), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
