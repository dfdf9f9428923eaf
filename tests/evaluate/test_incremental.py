"""The incremental API (``lm.start``, :class:`~reglm.evaluate.incremental.Hypotheses`): sentences
advanced word by word, forked and dropped, against ``lm.score``/``full_scores``/``next_words`` of
the whole sentences, for every model family; a stateless model's bounded context against a
direct forward over the window it keeps."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from reglm.api import WINDOW, TrainedModel
from reglm.config import build_config
from reglm.data.bpe import BPEVocab
from reglm.data.vocab import EOS
from reglm.encoders.base import concat_states, select_streams
from reglm.errors import ReglmError
from reglm.models import LanguageModel
from tests.test_scoring import FAMILIES, SENTENCES, V, _vocab

ALL = {**FAMILIES, "qrnn": ("qrnn-tiny", [])}
BPE_WORDS = {"lower": 5, "lowest": 3, "newer": 4, "wider": 2, "low": 6}


def _family(family: str) -> TrainedModel:
    preset, overrides = ALL[family]
    torch.manual_seed(1)
    return TrainedModel(LanguageModel(build_config(preset, overrides).model, V), _vocab(), torch.device("cpu"))


def _bpe(preset: str, overrides: list[str]) -> TrainedModel:
    bpe = BPEVocab.train(BPE_WORDS, 18)
    torch.manual_seed(2)
    return TrainedModel(LanguageModel(build_config(preset, overrides).model, len(bpe)), bpe, torch.device("cpu"))


def _advance_all(lm: TrainedModel, sentences: list[str], **start: Any) -> list[list[float]]:
    """Every sentence advanced word by word in one set of hypotheses, ``<eos>`` last; a finished
    hypothesis is dropped (``select``) as a decoder drops it. Returns each word's log-probability."""
    words = [s.split() + [EOS] for s in sentences]
    scores: list[list[float]] = [[] for _ in sentences]
    hyps, rows = lm.start(len(sentences), **start), list(range(len(sentences)))
    step = 0
    while rows:
        log_p = hyps.advance([words[r][step] for r in rows])
        for r, v in zip(rows, log_p.tolist()):
            scores[r].append(v)
        step += 1
        keep = [i for i, r in enumerate(rows) if step < len(words[r])]
        rows = [rows[i] for i in keep]
        if rows:
            hyps = hyps.select(keep)
    return scores


@pytest.mark.parametrize("family", list(ALL))
def test_word_by_word_gives_the_scores_of_whole_sentences(family: str) -> None:
    lm = _family(family)
    sentences = [*SENTENCES, "w3 zebra w4"]
    got = _advance_all(lm, sentences)
    expected = lm.full_scores_batch(sentences)
    for words, row in zip(expected, got):
        assert row == pytest.approx([w.log_prob for w in words], abs=1e-5)
    assert [sum(row) for row in got] == pytest.approx(lm.score_batch(sentences), abs=1e-5)


@pytest.mark.parametrize("penalty", ["share", None, 3.0])
def test_an_unknown_word_scores_as_in_score_under_every_oov_setting(penalty: str | float | None) -> None:
    lm = _family("awd-lstm")
    sentences = ["w3 zebra w4", "w1 w2"]
    got = _advance_all(lm, sentences, oov_penalty=penalty, base=10)
    expected = lm.full_scores_batch(sentences, oov_penalty=penalty, base=10)
    for words, row in zip(expected, got):
        assert row == pytest.approx([w.log_prob for w in words], abs=1e-5)
    raw = _advance_all(lm, sentences[:1], oov_penalty=None, base=10)[0]
    assert (got[0][1] < raw[1]) == (penalty is not None) and got[0][0] == pytest.approx(raw[0], abs=1e-9)


@pytest.mark.parametrize("family", ["awd-lstm", "mos", "transformer-adaptive"])
def test_fork_drop_totals_and_next_words(family: str) -> None:
    lm = _family(family)
    hyps = lm.start(2, base=10)
    hyps.advance(["w1", "w2"])
    hyps = hyps.select([0, 0, 1])
    assert len(hyps) == 3
    log_p, ids = hyps.top_k(4)
    for row, prefix in enumerate(["w1", "w1", "w2"]):
        expected = lm.next_words(prefix, 4, base=10)
        assert [lm.vocab.itos[i] for i in ids[row].tolist()] == [w for w, _ in expected]
        assert log_p[row].tolist() == pytest.approx([v for _, v in expected], abs=1e-6)
    full = hyps.next_log_probs() * math.log(10)
    assert torch.logsumexp(full, 1).tolist() == pytest.approx([0.0] * 3, abs=1e-6), "a distribution per hypothesis"
    hyps.advance(torch.tensor([lm.vocab.stoi["w3"], lm.vocab.stoi["w4"], lm.vocab.stoi["w5"]]))
    expected = lm.score_batch(["w1 w3", "w1 w4", "w2 w5"], base=10, eos=False)
    assert hyps.totals.tolist() == pytest.approx(expected, abs=1e-6)
    last = hyps.select([2])
    last.advance([EOS])
    assert float(last.totals[0]) == pytest.approx(lm.score("w2 w5", base=10), abs=1e-6)
    assert hyps.totals.tolist() == pytest.approx(expected, abs=1e-6), "select leaves the original as it was"


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [("tiny", []), ("transformer-tiny", ["model.input.cutoffs=6,12", "model.output.cutoffs=6,12"])],
)
def test_sub_word_model_advances_by_words_of_different_unit_counts(preset: str, overrides: list[str]) -> None:
    lm = _bpe(preset, overrides)
    sentences = ["lowest newer", "low wider", "wider lowest"]
    assert len({len(u) for u in lm.subword.word_units(["lowest", "low", "wider"])}) > 1, (
        "words of different unit counts"
    )
    got = _advance_all(lm, sentences)
    assert [sum(row) for row in got] == pytest.approx(lm.score_batch(sentences), abs=1e-5)
    with pytest.raises(ReglmError, match="sub-word"):
        lm.start(1).top_k(3)


def test_stateless_context_keeps_the_last_tokens() -> None:
    lm = _family("transformer-adaptive")
    words = "w1 w2 w3 w4 w5 w6 w7".split()
    hyps = lm.start(1, context=4)
    got = [float(hyps.advance([w])[0]) for w in words]
    stream = [lm.vocab.eos_id, *(lm.vocab.stoi[w] for w in words)]
    expected = []
    with torch.no_grad():
        for t in range(1, len(stream)):
            window = stream[max(0, t - 4) : t]
            log_p, _ = lm.model.log_probs(torch.tensor([window]))
            expected.append(float(log_p[0, -1, stream[t]]))
    assert got == pytest.approx(expected, abs=1e-5)
    assert got[:3] == pytest.approx([w.log_prob for w in lm.full_scores(" ".join(words))][:3], abs=1e-5), (
        "within the bound: score's numbers"
    )
    assert lm.start(1).context == WINDOW, "no run configuration: the API's window"
    lm.run_config = build_config("transformer-tiny")
    assert lm.start(1).context == 16, "the block size the model was trained on"


@pytest.mark.parametrize("family", ["awd-lstm", "vd-lstm-untied", "qrnn"])
def test_state_select_by_index_forks_and_drops_streams(family: str) -> None:
    lm = _family(family)
    out = lm.model(torch.randint(0, 50, (3, 4)), lm.model.init_state(3))
    picked = select_streams(out.state, torch.tensor([2, 0, 0]))
    by_slices = concat_states(
        [
            select_streams(out.state, slice(2, 3)),
            select_streams(out.state, slice(0, 1)),
            select_streams(out.state, slice(0, 1)),
        ]
    )
    for a, b in zip(picked.state_dict(), by_slices.state_dict()):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_bad_calls_are_reglm_errors() -> None:
    lm = _family("awd-lstm")
    hyps = lm.start(2)
    with pytest.raises(ReglmError, match="one word"):
        hyps.advance(["w1"])
    with pytest.raises(ReglmError, match="one word"):
        hyps.advance("w1 w2")
    with pytest.raises(ReglmError, match="word ids"):
        hyps.advance(torch.tensor([0, 10_000]))
    with pytest.raises(ReglmError, match="positions"):
        hyps.select([0, 2])
    with pytest.raises(ReglmError, match="positions"):
        hyps.select([-1])
    with pytest.raises(ReglmError, match="non-empty"):
        hyps.select([])
    with pytest.raises(ReglmError, match="positive integer"):
        lm.start(0)
    with pytest.raises(ReglmError, match="positive integer"):
        hyps.top_k(0)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["awd-lstm", "transformer-adaptive"])
def test_on_cuda_word_by_word_gives_the_scores_of_whole_sentences(family: str) -> None:
    cpu = _family(family)
    lm = TrainedModel(cpu.model.cuda(), cpu.vocab, torch.device("cuda"))
    got = _advance_all(lm, SENTENCES)
    # cuDNN/cuBLAS pick different kernels for one step and for a whole sentence: 1e-4 on sums of ~50 nats
    assert [sum(row) for row in got] == pytest.approx(lm.score_batch(SENTENCES), abs=1e-4)
    log_p, ids = lm.start(2).top_k(3)
    assert log_p.device.type == "cpu" and ids.shape == (2, 3)
