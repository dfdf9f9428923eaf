"""Every registered evaluation mode through the Python API and through ``reglm eval``: the same
numbers on the same text of a tiny trained run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import reglm
from reglm.cli import main
from reglm.data import load_corpus
from reglm.errors import ReglmError
from reglm.evaluate.modes import MODES
from tests.test_registries import MODE_SPECS

STATS = ",max_train_tokens=400,stats_batch_size=4"
"""Dynamic evaluation's rms rule on a slice of the training split (its gradient statistics)."""
SPECS = {**MODE_SPECS, "dynamic": "lr=1e-3,lambda=0.002,segment=5" + STATS}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("modes") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "train.finetune=false", "train.epochs=1"]) == 0
    return out


def text_of(lm: reglm.TrainedModel, ids: list[int]) -> str:
    """The text whose ids (one ``<eos>`` per line) are ``ids``, a split ending with ``<eos>``."""
    words = [lm.vocab.itos[i] for i in ids]
    text = " ".join(words).replace(" <eos> ", "\n").replace(" <eos>", "\n")
    assert lm.text_to_ids(text) == ids
    return text


@pytest.mark.parametrize("name", list(MODES))
def test_the_api_and_the_cli_give_the_same_numbers(name: str, run: Path, capsys: pytest.CaptureFixture) -> None:
    lm = reglm.load(run)
    corpus = load_corpus(lm.run_config)
    test, valid, train = (text_of(lm, getattr(corpus, split).tolist()) for split in ("test", "valid", "train"))
    got = lm.evaluate(test, name, SPECS[name], valid=valid, train=train)
    flag = [] if name == "plain" else [f"--{name}", SPECS[name]]
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "test", "--json", *flag]) == 0
    want = json.loads(capsys.readouterr().out)
    assert want["mode"] == name
    assert got.tokens == want["tokens"] == corpus.test.numel() - 1
    # the same computation on the same ids in one process: equal up to summation order at most
    assert got.loss == pytest.approx(want["loss"], rel=1e-9)


def test_the_api_refuses_an_unknown_mode_and_a_search_without_valid(run: Path) -> None:
    lm = reglm.load(run)
    with pytest.raises(ReglmError, match="unknown evaluation mode 'nope'; choose one of plain, "):
        lm.evaluate("w1 w2\n", "nope")
    with pytest.raises(ReglmError, match="pass valid=TEXT"):
        lm.evaluate("w1 w2\n", "cache-search", MODE_SPECS["cache-search"])
