"""reglm.load: score and perplexity against a direct computation; evaluation against a slow loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import reglm
from reglm.config import build_config
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import evaluate
from reglm.train.run import train


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("api") / "run"
    train(build_config("tiny", ["train.epochs=1", "train.finetune=false"]), out, progress=False)
    return out


def _direct_log_probs(lm: reglm.TrainedModel, words: list[str]) -> torch.Tensor:
    """One forward over the whole sequence, no windows: the reference."""
    ids = [lm.vocab.eos_id] + [lm.vocab.stoi[w] for w in words]
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        logp = lm.model.output.log_probs(lm.model(x).output)[0]
    return logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).double()


def test_score_is_the_total_log_probability_with_eos(run: Path) -> None:
    lm = reglm.load(run)
    sentence = "w1 w5 w2 w9"
    expected = float(_direct_log_probs(lm, sentence.split() + ["<eos>"]).sum())
    assert lm.score(sentence) == pytest.approx(expected, abs=1e-4)
    assert lm.score(sentence) < 0


def test_perplexity_over_windows_equals_direct(run: Path) -> None:
    lm = reglm.load(run)
    lines = [" ".join(f"w{(i * 7 + j) % 50 + 1}" for j in range(10)) for i in range(40)]
    words = [w for line in lines for w in line.split() + ["<eos>"]]
    assert len(words) > 256, "the text must span several windows"
    expected = math.exp(-float(_direct_log_probs(lm, words).mean()))
    assert lm.perplexity("\n".join(lines) + "\n") == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 10])
def test_evaluate_equals_a_slow_token_loop(run: Path, batch_size: int) -> None:
    """The 202 targets of 203 tokens dealt into contiguous streams (68, 67, 67 for 3), each read
    token by token from a zero state that starts on the token before its first target."""
    lm = reglm.load(run)
    ids = torch.randint(0, len(lm.vocab), (203,))
    fast = evaluate(lm.model, ids, batch_size=batch_size, bptt=7)
    q, r = divmod(202, batch_size)
    total, count, first = 0.0, 0, 1
    with torch.no_grad():
        for b in range(batch_size):
            n = q + (b < r)
            state = lm.model.init_state(1)
            for t in range(first, first + n):
                out = lm.model(ids[None, t - 1 : t], state)
                state = out.state
                total += float(lm.model.output.nll(out, ids[None, t : t + 1]))
                count += 1
            first += n
    assert fast.tokens == count == 202
    assert fast.loss == pytest.approx(total / count, rel=1e-5)


def test_load_errors(tmp_path: Path, run: Path) -> None:
    with pytest.raises(ReglmError, match="does not exist"):
        reglm.load(tmp_path / "nothing")
    with pytest.raises(ReglmError, match="no best"):
        reglm.load(tmp_path)
    lm = reglm.load(run, which="last")
    with pytest.raises(ReglmError, match="zebra"):
        lm.generate(3, prompt="zebra")
