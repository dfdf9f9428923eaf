"""A line longer than a model's trained context (or the token budget) is read in windows: in
training under sentence batching, and when scoring, so no line makes unbounded work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import reglm
from reglm.config import build_config
from reglm.data.batchings import trained_context
from reglm.data.sentence_plan import SentencePlan
from reglm.data.windows import ContextPlan
from reglm.evaluate.sentences import sentence_log_probs
from reglm.train.run import train


def test_a_sentence_longer_than_the_token_budget_is_cut_into_pieces_of_the_budget() -> None:
    torch.manual_seed(0)
    lengths = [3, 500, 7, 64, 65, 129, 1]
    ids = torch.cat([torch.cat([torch.randint(1, 50, (n,)), torch.zeros(1, dtype=torch.long)]) for n in lengths])
    ids = torch.cat([torch.zeros(1, dtype=torch.long), ids])
    plan = SentencePlan(ids, 0, 64)
    seen = []
    for window in plan.windows():
        assert window.inputs.numel() <= 64
        seen.append(window.positions[window.scored])
        torch.testing.assert_close(window.targets[window.scored], ids[window.positions[window.scored]], rtol=0, atol=0)
        rows = window.scored.any(1)
        starts = window.positions[rows, 0]
        torch.testing.assert_close(
            window.inputs[rows, 0], ids[starts - 1], rtol=0, atol=0
        )  # each piece starts after the token before it
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.arange(1, ids.numel())), "every target once"


@pytest.fixture(scope="module")
def transformer(tmp_path_factory: pytest.TempPathFactory) -> reglm.TrainedModel:
    run = tmp_path_factory.mktemp("transformer") / "run"
    train(build_config("transformer-tiny", ["train.epochs=1", "train.finetune_epochs=0"]), run, progress=False)
    return reglm.load(run)


def test_a_line_longer_than_a_transformers_context_is_scored_in_windows(transformer: reglm.TrainedModel) -> None:
    lm = transformer
    window = trained_context(lm.run_config.train.batching)
    words = [w for w in lm.vocab.itos if w not in ("<eos>", "<unk>")]
    generator = torch.Generator().manual_seed(1)
    sentence = [words[i] for i in torch.randint(0, len(words), (4 * window + 3,), generator=generator).tolist()]
    scores = lm.full_scores(" ".join(sentence))
    assert len(scores) == len(sentence) + 1 and [s.word for s in scores[:-1]] == sentence
    got = torch.tensor([s.log_prob for s in scores], dtype=torch.float64)
    # the reference: each target scored alone, after the same tokens as its window, in one piece
    ids = [lm.vocab.eos_id, *(lm.vocab.stoi[w] for w in sentence), lm.vocab.eos_id]
    for begin, first, last in ContextPlan(torch.tensor(ids), window, window // 2).spans:
        for target in {first, (first + last) // 2, last}:
            alone = sentence_log_probs(lm.model, [ids[begin : target + 1]], ids[begin - 1], window=10**9)[0][-1]
            torch.testing.assert_close(
                got[target - 1], alone, rtol=1e-4, atol=1e-4
            )  # float32 sums in another batch shape


def test_a_line_of_100k_words_is_scored_in_bounded_work(transformer: reglm.TrainedModel) -> None:
    word = next(w for w in transformer.vocab.itos if w not in ("<eos>", "<unk>"))
    scores = transformer.full_scores(" ".join([word] * 100_000))
    assert len(scores) == 100_001 and all(s.log_prob < 0 for s in scores[::997])


def test_a_long_sentence_of_a_stateful_model_is_the_one_pass_result(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(
        build_config("tiny", ["data.synthetic_sentences=200", "train.epochs=1", "train.finetune_epochs=0"]),
        run,
        progress=False,
    )
    lm = reglm.load(run)
    ids = torch.randint(1, len(lm.vocab), (300,), generator=torch.Generator().manual_seed(2)).tolist()
    whole = sentence_log_probs(lm.model, [ids], lm.vocab.eos_id, window=10**9)[0]
    for window in (7, 64):
        torch.testing.assert_close(
            sentence_log_probs(lm.model, [ids, ids[:5]], lm.vocab.eos_id, window=window)[0], whole, rtol=1e-5, atol=1e-5
        )
