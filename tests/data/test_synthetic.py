"""The synthetic trigram language (Popov & Kudinov 2019, appendix A) against plain-Python references."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from reglm.data.corpus import Corpus, read_tokens
from reglm.data.synthetic import STREAMS, TrigramLanguage, synthetic_corpus, synthetic_stats
from reglm.data.vocab import EOS, Vocab
from reglm.errors import ReglmError

SMALL = (200, 50, 50)


@pytest.fixture(scope="module")
def lang() -> TrigramLanguage:
    return TrigramLanguage(seed=0)


def reference_probs(lang: TrigramLanguage, i: int, j: int) -> list[float]:
    """p(k | i, j) for k = 1..1000 straight from the appendix formulas, in plain Python: under
    ``restart`` one xi per triple in both beta factors, under ``stream`` a draw per factor."""
    gamma = 0.75

    def beta(a: int, b: int, xi: int) -> float:
        return (a * (abs(a - b + xi) + 1)) ** (-gamma)

    weights = []
    for k in range(1, 1001):
        if j == 0:  # first word: alpha(k)
            weights.append((1 / 50) * math.log(k + 1) / math.log(51) if k <= 50 else 1 / k)
            continue
        xi = int(lang.xi(i, j, k))
        w = beta(k, j, xi if lang.rule == "restart" else int(lang.xi(i, j, k, factor=1)))
        if i > 0:
            w *= beta(i, j, xi)
        weights.append(w)
    total = sum(weights)
    return [w / total for w in weights]


def test_alpha_values(lang: TrigramLanguage) -> None:
    alpha = lang.alpha()
    assert alpha.shape == (1000,)
    assert alpha[0] == pytest.approx(math.log(2) / (50 * math.log(51)))
    assert alpha[49] == pytest.approx(1 / 50)
    assert alpha[50] == pytest.approx(1 / 51)
    assert alpha[999] == pytest.approx(1 / 1000)


def test_xi_is_uniform_deterministic_and_seeded(lang: TrigramLanguage) -> None:
    i, j, k = np.meshgrid(np.arange(1, 41), np.arange(1, 41), np.arange(1, 41), indexing="ij")
    xi = lang.xi(i, j, k)
    assert xi.shape == (40, 40, 40) and xi.dtype == np.int64
    counts = np.bincount(xi.ravel(), minlength=6)
    assert len(counts) == 6
    expected = xi.size / 6
    assert ((counts - expected) ** 2 / expected).sum() < 30  # chi-square, 5 dof
    assert np.array_equal(xi, TrigramLanguage(seed=0).xi(i, j, k))
    assert (TrigramLanguage(seed=1).xi(i, j, k) != xi).mean() > 0.7
    assert int(lang.xi(3, 4, 5)) == int(xi[2, 3, 4])
    second = lang.xi(i, j, k, factor=1)
    assert ((np.bincount(second.ravel(), minlength=6) - expected) ** 2 / expected).sum() < 30
    assert (second == xi).mean() == pytest.approx(1 / 6, abs=0.01)  # the two draws of a triple are unrelated


@pytest.mark.parametrize("rule", ["stream", "restart"])
@pytest.mark.parametrize(("i", "j"), [(0, 0), (0, 7), (3, 7), (1000, 1), (50, 999), (12, 12)])
def test_next_word_probs_match_reference(rule: str, i: int, j: int) -> None:
    lang = TrigramLanguage(seed=0, rule=rule)
    probs = lang.next_word_probs(np.array([i]), np.array([j]))
    assert probs.shape == (1, 1000)
    np.testing.assert_allclose(probs[0], reference_probs(lang, i, j), rtol=1e-12, atol=0)


def test_rules_differ_only_where_a_context_has_two_words() -> None:
    stream, restart = TrigramLanguage(seed=0), TrigramLanguage(seed=0, rule="restart")
    assert stream.rule == "stream"
    start, context = (np.array([0]), np.array([0])), (np.array([3]), np.array([7]))
    np.testing.assert_array_equal(stream.next_word_probs(*start), restart.next_word_probs(*start))
    assert not np.allclose(stream.next_word_probs(*context), restart.next_word_probs(*context))
    with pytest.raises(ValueError, match="rule"):
        TrigramLanguage(rule="stationary")


def test_next_word_probs_normalize(lang: TrigramLanguage) -> None:
    rng = np.random.default_rng(1)
    prev1 = rng.integers(1, 1001, 300)
    prev2 = np.where(rng.random(300) < 0.2, 0, rng.integers(1, 1001, 300))
    probs = lang.next_word_probs(prev2, prev1)
    assert probs.shape == (300, 1000) and (probs > 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)


def test_invalid_context(lang: TrigramLanguage) -> None:
    with pytest.raises(ValueError):
        lang.next_word_probs(np.array([5]), np.array([0]))
    with pytest.raises(ValueError):
        lang.next_word_probs(np.array([0]), np.array([1001]))


@pytest.mark.parametrize(("i", "j"), [(0, 0), (0, 40), (12, 40)])
def test_sampling_frequencies_follow_the_conditional(lang: TrigramLanguage, i: int, j: int) -> None:
    n = 40_000
    words = lang.sample_next(np.full(n, i), np.full(n, j), np.random.default_rng(7))
    assert words.min() >= 1 and words.max() <= 1000
    p = np.array(reference_probs(lang, i, j))
    top = np.argsort(-p)[:20]
    observed = np.bincount(words - 1, minlength=1000)
    obs = np.append(observed[top], n - observed[top].sum())
    exp = np.append(p[top] * n, (1 - p[top].sum()) * n)
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert chi2 < 52.4  # 20 dof, p = 1e-4


def test_stream_starts() -> None:
    lang = TrigramLanguage(seed=0)
    np.testing.assert_array_equal(lang.stream_starts(3), [0, 1, 2])
    starts = lang.stream_starts(100)
    assert len(starts) == STREAMS and starts[0] == 0
    assert set(np.diff(np.append(starts, 100))) <= {100 // STREAMS, 100 // STREAMS + 1}
    np.testing.assert_array_equal(TrigramLanguage(rule="restart").stream_starts(5), np.arange(5))


def test_stream_sentences_continue_their_predecessor() -> None:
    """A walk over the split: each word's context is the two words before it in the file, back to
    the start context (0, 0) at the first row of each text."""
    lang = TrigramLanguage(seed=1)
    n = STREAMS + 3
    sentences, logp = lang.sample_with_log_prob(n, np.random.default_rng(0))
    assert sentences.shape == (n, 10)
    starts = set(lang.stream_starts(n).tolist())
    contexts = []
    for row in range(n):
        if row in starts:
            i, j = 0, 0
        for word in sentences[row]:
            contexts.append((i, j))
            i, j = j, int(word)
    prev2, prev1 = np.array(contexts).T
    probs = lang.next_word_probs(prev2, prev1)
    expected = np.log(probs[np.arange(n * 10), sentences.ravel() - 1]).reshape(n, 10)
    np.testing.assert_allclose(logp, expected, rtol=1e-12)
    np.testing.assert_allclose(lang.log_prob(sentences), logp, rtol=1e-12)


def test_stream_rule_concentrates_the_language() -> None:
    """The stream reading keeps the chain in its usual mix of contexts; restarting every sentence
    from the start context is flatter (full corpora, seed 0: top-50 share 67.6% vs 54.5%; here
    1,000 sentences, where the sampling error of a share is about a point)."""
    shares = {}
    for rule in ("stream", "restart"):
        words = TrigramLanguage(seed=0, rule=rule).sample(1000, np.random.default_rng(0)).ravel()
        counts = np.sort(np.bincount(words, minlength=1001)[1:])[::-1]
        shares[rule] = counts[:50].sum() / counts.sum()
    assert shares["stream"] > 0.62 and shares["restart"] < 0.59 and shares["stream"] - shares["restart"] > 0.07


@pytest.mark.parametrize("rule", ["stream", "restart"])
def test_sentences_and_log_prob(rule: str) -> None:
    lang = TrigramLanguage(seed=0, rule=rule)
    sentences, logp = lang.sample_with_log_prob(40, np.random.default_rng(3))
    assert sentences.shape == (40, 10) and logp.shape == (40, 10)
    assert sentences.min() >= 1 and sentences.max() <= 1000
    np.testing.assert_array_equal(sentences, lang.sample(40, np.random.default_rng(3)))
    direct = lang.log_prob(sentences)
    np.testing.assert_allclose(direct, logp, rtol=1e-12)
    if rule == "restart":  # every sentence from the start context
        padded = np.concatenate([np.zeros((40, 2), dtype=np.int64), sentences], axis=1)
        for t in range(10):
            probs = lang.next_word_probs(padded[:, t], padded[:, t + 1])
            gathered = np.log(probs[np.arange(40), sentences[:, t] - 1])
            np.testing.assert_allclose(direct[:, t], gathered, rtol=1e-12)
    assert not np.array_equal(sentences, lang.sample(40, np.random.default_rng(4)))
    assert not np.array_equal(sentences, TrigramLanguage(seed=5, rule=rule).sample(40, np.random.default_rng(3)))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Corpus, object]:
    root = tmp_path_factory.mktemp("syn")
    return synthetic_corpus(seed=2, data_dir=root, sizes=SMALL), root


def test_corpus_files_and_vocab(small) -> None:
    corpus, root = small
    directory = root / "synthetic-stream-2-200-50-50"
    assert sorted(p.name for p in root.iterdir()) == ["synthetic-stream-2-200-50-50"]
    lines = (directory / "train.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200 and all(len(line.split()) == 10 for line in lines)
    assert corpus.train.numel() == 200 * 11 and corpus.valid.numel() == corpus.test.numel() == 50 * 11
    vocab = corpus.vocab
    assert len(vocab) == 1001 and vocab.unk_id is None
    assert set(vocab.itos) == {EOS} | {f"w{k}" for k in range(1, 1001)}
    counter = Counter(read_tokens(directory / "train.txt"))
    assert [counter[w] for w in vocab.itos] == vocab.counts
    assert vocab == Vocab.load(directory / "vocab.txt")


def test_truth_aligned_with_ids(small) -> None:
    corpus, root = small
    lang = TrigramLanguage(seed=2)
    assert corpus.truth is not None and set(corpus.truth) == {"valid", "test"}
    for split in ("valid", "test"):
        ids = corpus.split(split)
        truth = corpus.truth[split]
        assert truth.shape == ids.shape and truth.dtype == torch.float64
        eos = ids == corpus.vocab.eos_id
        assert (truth[eos] == 0).all() and (truth[~eos] < 0).all()
        words = [int(tok[1:]) for tok in corpus.vocab.decode(ids[~eos].tolist())]
        expected = lang.log_prob(np.array(words).reshape(-1, 10))  # the split's rows in file order
        np.testing.assert_allclose(truth[~eos].numpy(), expected.ravel(), rtol=1e-12)


def test_corpus_is_cached_and_deterministic(small, tmp_path) -> None:
    corpus, root = small
    directory = root / "synthetic-stream-2-200-50-50"
    stamp = (directory / "train.txt").stat().st_mtime_ns
    again = synthetic_corpus(seed=2, data_dir=root, sizes=SMALL)
    assert (directory / "train.txt").stat().st_mtime_ns == stamp
    assert torch.equal(again.train, corpus.train) and torch.equal(again.truth["test"], corpus.truth["test"])
    fresh = synthetic_corpus(seed=2, data_dir=tmp_path, sizes=SMALL)
    assert fresh.vocab == corpus.vocab and torch.equal(fresh.valid, corpus.valid)
    fresh_valid = tmp_path / "synthetic-stream-2-200-50-50" / "valid.txt"
    assert fresh_valid.read_bytes() == (directory / "valid.txt").read_bytes()
    other = synthetic_corpus(seed=3, data_dir=tmp_path, sizes=SMALL)
    assert not torch.equal(other.train, corpus.train)


def test_restart_rule_keeps_its_own_directory(tmp_path) -> None:
    """Corpora of the earlier reading stay where runs made with it find them, generated as before."""
    corpus = synthetic_corpus(seed=2, data_dir=tmp_path, sizes=(20, 5, 5), rule="restart")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic-2-20-5-5"]
    lines = (tmp_path / "synthetic-2-20-5-5" / "valid.txt").read_text(encoding="utf-8").split()
    words = np.array([int(w[1:]) for w in lines]).reshape(5, 10)
    rng = np.random.default_rng(2)
    lang = TrigramLanguage(seed=2, rule="restart")
    lang.sample(20, rng)
    np.testing.assert_array_equal(words, lang.sample(5, rng))
    np.testing.assert_allclose(corpus.truth["valid"].numpy().reshape(5, 11)[:, :10], lang.log_prob(words), rtol=1e-12)
    with pytest.raises(ReglmError, match="synthetic rule"):
        synthetic_corpus(seed=2, data_dir=tmp_path, sizes=(20, 5, 5), rule="stationary")


def test_damaged_or_unwritable_cache(tmp_path) -> None:
    synthetic_corpus(seed=1, data_dir=tmp_path, sizes=(20, 5, 5))
    (tmp_path / "synthetic-stream-1-20-5-5" / "test-logprob.npy").unlink()
    with pytest.raises(ReglmError, match="test-logprob.npy; delete the directory"):
        synthetic_corpus(seed=1, data_dir=tmp_path, sizes=(20, 5, 5))
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(ReglmError, match="--data-dir"):
        synthetic_corpus(seed=1, data_dir=blocker, sizes=(20, 5, 5))


def test_stats(small) -> None:
    corpus, _ = small
    stats = synthetic_stats(corpus)
    assert stats["share_frequent"] + stats["share_almost"] + stats["share_rest"] == pytest.approx(1.0)
    assert stats["share_frequent"] > stats["share_almost"] > 0
    counts = sorted((c for t, c in zip(corpus.vocab.itos, corpus.vocab.counts) if t != EOS), reverse=True)
    assert stats["share_frequent"] == pytest.approx(sum(counts[:50]) / 2000)
    ids, truth = corpus.test, corpus.truth["test"]
    words = ids != corpus.vocab.eos_id
    assert stats["test_ppl"] == pytest.approx(math.exp(-truth[words].mean().item()))
    assert stats["test_ppl_rare"] > stats["test_ppl"] > stats["test_ppl_frequent"] > 1
    assert stats["ratio"] == pytest.approx(stats["test_ppl_rare"] / stats["test_ppl_frequent"])
    per_sentence = truth.numpy().reshape(50, 11)[:, :10].mean(axis=1)
    assert stats["test_ppl_se"] == pytest.approx(stats["test_ppl"] * per_sentence.std(ddof=1) / math.sqrt(50), rel=1e-9)
    plain = Corpus("plain", corpus.vocab, corpus.train, corpus.valid, corpus.test)
    with pytest.raises(ReglmError, match="synthetic"):
        synthetic_stats(plain)


def reference_xi_averaged(rule: str, i: int, j: int) -> list[float]:
    """The law with xi averaged out of the weights, in plain Python: every xi of a factor equally
    likely; under ``restart`` the one xi of a triple shared by both factors."""
    gamma = 0.75

    def beta(a: int, b: int, xi: int) -> float:
        return (a * (abs(a - b + xi) + 1)) ** (-gamma)

    if j == 0:
        return reference_probs(TrigramLanguage(seed=0, rule=rule), 0, 0)
    weights = []
    for k in range(1, 1001):
        if i == 0:
            weights.append(sum(beta(k, j, x) for x in range(6)) / 6)
        elif rule == "restart":
            weights.append(sum(beta(i, j, x) * beta(k, j, x) for x in range(6)) / 6)
        else:
            weights.append(sum(beta(i, j, x) * beta(k, j, y) for x in range(6) for y in range(6)) / 36)
    total = sum(weights)
    return [w / total for w in weights]


@pytest.mark.parametrize("rule", ["stream", "restart"])
def test_xi_averaged_law_matches_reference_and_is_the_reference_above_the_truth(rule: str) -> None:
    """``xi_averaged_probs`` is E_xi of the weights, normalized (plain-Python reference); it forgets
    which triples drew which xi, so on a sample its perplexity is above the true one; ``log_prob``
    with ``xi_averaged`` reads it at every word's context; ``synthetic_stats`` reports it."""
    lang = TrigramLanguage(seed=0, rule=rule)
    contexts = [(0, 0), (0, 7), (3, 7), (1000, 1), (12, 12), (50, 999)]
    probs = lang.xi_averaged_probs(np.array([c[0] for c in contexts]), np.array([c[1] for c in contexts]))
    for row, (i, j) in zip(probs, contexts):
        np.testing.assert_allclose(row, reference_xi_averaged(rule, i, j), rtol=1e-12, atol=0)
    sentences, logp = lang.sample_with_log_prob(300, np.random.default_rng(4))
    averaged = lang.log_prob(sentences, xi_averaged=True)
    assert averaged[0, 2] == pytest.approx(
        math.log(lang.xi_averaged_probs(sentences[0, :1], sentences[0, 1:2])[0, sentences[0, 2] - 1])
    )
    assert 1.01 < math.exp(logp.mean() - averaged.mean()) < 1.2


def test_stats_report_the_xi_averaged_perplexity(small) -> None:
    corpus, _ = small
    stats = synthetic_stats(corpus, language=TrigramLanguage(seed=2))
    rows = np.array(
        [[int(corpus.vocab.itos[t][1:]) for t in row] for row in corpus.test.reshape(50, 11)[:, :10].tolist()]
    )
    expected = math.exp(-TrigramLanguage(seed=2).log_prob(rows, xi_averaged=True).mean())
    assert stats["test_ppl_xi_averaged"] == pytest.approx(expected, rel=1e-12)
    assert stats["test_ppl_xi_averaged"] > stats["test_ppl"]
    assert "test_ppl_xi_averaged" not in synthetic_stats(corpus)
