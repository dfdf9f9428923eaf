"""The synthetic trigram language of Popov & Kudinov (2019), appendix A, with known true probabilities.

Paper rule: 1000 words (ids 1..1000) plus a start token every sentence begins with; sentences
of 10 words; 80k / 10k / 10k sentences for train / valid / test. The trigram ``(i, j, k)`` has
probability proportional to ``alpha(j) * beta(i, j) * beta(k, j)`` with

    alpha(j)   = (1/50) * log(j + 1) / log(51)   for j <= 50,   1/j otherwise
    beta(i, j) = (i * (|i - j + xi| + 1)) ** (-gamma),            gamma = 0.75

and ``xi`` uniform on {0, ..., 5}, drawn independently for each triple ``(i, j, k)``.

Our reading, where the paper leaves room (``rule``; docs/discriminator-finetuning.md lists the
readings measured against the paper's corpus statistics):

* The next-word law is the trigram law conditioned on the context, ``p(k | i, j) ∝ beta(i, j) *
  beta(k, j)`` (``alpha(j)`` does not depend on ``k`` and cancels).
* ``xi`` is not stored (a 10^9 table): each draw is a counter-based hash of ``(seed, i, j, k)``
  and the factor it enters (the splitmix64 finalizer, in vectorized uint64 arithmetic), so the
  1000 conditionals of any context are computed on demand, exactly and reproducibly.
* ``rule="stream"`` (the default): each beta factor of a triple draws its own ``xi`` (as a
  ``beta`` that samples ``xi`` on every call would), and the sentences of a split are consecutive
  10-word pieces of one text the trigram chain writes, so a sentence's first words are predicted
  from the last two words of the sentence before; the start token only marks where a sentence
  begins. A split is written by :data:`STREAMS` such texts side by side, one after the other in
  the file, each beginning at the start context below.
* ``rule="restart"`` (the reading before; its corpora are unchanged): one ``xi`` per triple
  enters both beta factors, and every sentence begins afresh at the start context.
* Start context (id 0 is the start token): the first word is drawn from ``p(j) ∝ alpha(j)``
  (the middle-word weight of the trigram law); the second word, in context ``(start, w1)``, from
  ``p(k | start, w1) ∝ beta(k, w1)`` (the start token contributes no beta factor).
* Corpus files hold one sentence per line, words written ``w1`` .. ``w1000``; the ``<eos>`` the
  corpus rule appends after each line plays the start token's role. Since sentences have a fixed
  length, ``<eos>`` has true probability 1.

Every probability here is exact up to float64 rounding; sampling is inverse-CDF on the exact
conditional.
"""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from reglm.data.corpus import Corpus, cache_dir, load_directory
from reglm.data.vocab import EOS, Vocab
from reglm.errors import ReglmError
from reglm.io import temp_sibling

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_ROWS_PER_CHUNK = 256
_LOW32 = np.uint64(0xFFFFFFFF)
DEFAULT_SIZES = (80000, 10000, 10000)
RULES = ("stream", "restart")
"""Readings of the paper's rule (see the module docstring); the first is the default."""
SYNTHETIC_VOCAB_SIZE = 1001
"""The synthetic corpus's vocabulary: the paper's 1000 words and ``<eos>``."""
STREAMS = 16
"""``rule="stream"``: texts the trigram chain writes side by side for one split."""
PAPER_STATS = {
    "share_frequent": 0.705,
    "share_almost": 0.147,
    "share_rest": 0.148,
    "test_ppl": 78.14,
    "test_ppl_frequent": 29.74,
    "test_ppl_rare": 766.53,
    "ratio": 25.8,
}
"""The paper's statistics of its corpus (appendix A; Table 1, true distribution)."""


def _mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a bijection of uint64 with good avalanche (products wrap mod 2**64)."""
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z *= _MUL1
        z ^= z >> np.uint64(27)
        z *= _MUL2
        z ^= z >> np.uint64(31)
    return z


class TrigramLanguage:
    """The trigram language; words are ``1..vocab_size``, ``0`` is the start token (in contexts only).

    Args:
        seed: selects the ``xi`` of every triple (the language itself).
        vocab_size: number of words (1000 in the paper); at most ``2**21 - 1``.
        sentence_length: words per sentence (10 in the paper).
        gamma: the exponent of ``beta`` (0.75 in the paper).
        rule: ``stream`` or ``restart``, the reading of the paper's rule (module docstring).
    """

    def __init__(
        self,
        seed: int = 0,
        vocab_size: int = 1000,
        sentence_length: int = 10,
        gamma: float = 0.75,
        rule: str = "stream",
    ) -> None:
        if not 1 <= vocab_size < 2**21:
            raise ValueError(f"vocab_size must be in [1, 2**21), got {vocab_size}")
        if sentence_length < 1:
            raise ValueError(f"sentence_length must be >= 1, got {sentence_length}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        self.rule = rule
        self.seed = seed
        self.vocab_size = vocab_size
        self.sentence_length = sentence_length
        self.gamma = gamma
        self._seed_key = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _GOLDEN)[0]
        # _pow[m] = m ** -gamma for m >= 1; _pow[0] = 1 stands for "no factor" (the start token).
        self._pow = np.arange(2 * vocab_size + 7, dtype=np.float64)
        self._pow[0] = 1.0
        self._pow[1:] **= -gamma
        self._words = np.arange(1, vocab_size + 1, dtype=np.int64)

    def alpha(self) -> np.ndarray:
        """``(V,)``: ``alpha(j)`` for ``j = 1..V`` (paper, appendix A)."""
        j = self._words.astype(np.float64)
        return np.where(j <= 50, np.log(j + 1) / (50 * np.log(51)), 1.0 / j)

    def _hash(self, i: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
        """``mix64(i << 42 | j << 21 | k  ^  mix64(seed + golden))``, broadcast (uint64)."""
        key = (
            (np.asarray(i, dtype=np.uint64) << np.uint64(42))
            | (np.asarray(j, dtype=np.uint64) << np.uint64(21))
            | np.asarray(k, dtype=np.uint64)
        )
        return _mix64(np.asarray(key ^ self._seed_key, dtype=np.uint64))

    @staticmethod
    def _to_xi(half: np.ndarray) -> np.ndarray:
        """A 32-bit value -> ``{0..5}``: ``(half * 6) >> 32``."""
        return ((half * np.uint64(6)) >> np.uint64(32)).astype(np.int64)

    def xi(self, i: np.ndarray, j: np.ndarray, k: np.ndarray, factor: int = 0) -> np.ndarray:
        """``xi_ijk`` in ``{0..5}`` (int64), broadcast over ``i``, ``j``, ``k`` (ids in ``0..V``).

        From the hash of the triple: its high 32 bits (``factor=0``, the draw of the first beta
        factor) or its low 32 bits (``factor=1``, the second factor's own draw under ``stream``).
        The key is distinct per triple and ``mix64`` is a bijection, so the draws look independent.
        """
        h = self._hash(i, j, k)
        return self._to_xi(h >> np.uint64(32) if factor == 0 else h & _LOW32)

    def _weights(self, prev2: np.ndarray, prev1: np.ndarray, averaged: bool = False) -> np.ndarray:
        """``(n, V)`` unnormalized next-word weights of ``n`` contexts (see the module docstring);
        ``averaged``: with ``xi`` averaged out (:meth:`xi_averaged_probs`)."""
        i = prev2[:, None]
        j = prev1[:, None]
        k = self._words[None, :]
        pow_ = self._pow
        if averaged:
            shifts = np.arange(6)[:, None, None]
            near_k = pow_[np.abs(k - j + shifts) + 1]
            near_i = pow_[(np.abs(i - j + shifts) + 1) * (i > 0)]
            w = (near_k * near_i).mean(axis=0) if self.rule == "restart" else near_k.mean(axis=0) * near_i.mean(axis=0)
        else:
            h = self._hash(i, j, k)
            xi_i = self._to_xi(h >> np.uint64(32))
            xi_k = xi_i if self.rule == "restart" else self._to_xi(h & _LOW32)
            w = pow_[np.abs(k - j + xi_k) + 1]
            w *= pow_[(np.abs(i - j + xi_i) + 1) * (i > 0)]
        w *= pow_[k]
        start = prev1 == 0
        if start.any():
            w[start] = self.alpha()
        return w

    def _check_context(self, prev2: np.ndarray, prev1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        prev2 = np.asarray(prev2, dtype=np.int64).reshape(-1)
        prev1 = np.asarray(prev1, dtype=np.int64).reshape(-1)
        if prev2.shape != prev1.shape:
            raise ValueError(f"prev2 and prev1 differ in length: {prev2.shape} vs {prev1.shape}")
        for name, arr in (("prev2", prev2), ("prev1", prev1)):
            if arr.size and (arr.min() < 0 or arr.max() > self.vocab_size):
                raise ValueError(f"{name} holds ids outside 0..{self.vocab_size}")
        if np.any((prev1 == 0) & (prev2 != 0)):
            raise ValueError("a start token (0) in prev1 must have a start token in prev2")
        return prev2, prev1

    def next_word_probs(self, prev2: np.ndarray, prev1: np.ndarray) -> np.ndarray:
        """``(N, V)`` float64: column ``c`` is ``p(word c+1 | prev2, prev1)``; contexts ``(N,)``, 0 = start."""
        prev2, prev1 = self._check_context(prev2, prev1)
        w = self._weights(prev2, prev1)
        return w / w.sum(axis=1, keepdims=True)

    def xi_averaged_probs(self, prev2: np.ndarray, prev1: np.ndarray) -> np.ndarray:
        """``(N, V)`` float64: the law with ``xi`` averaged out before normalizing, ``q(k | i, j) ∝
        E_xi[beta(i, j) * beta(k, j)]`` (under ``stream`` each factor's own ``xi``: ``q`` depends on
        ``j`` alone). ``xi`` varies from triple to triple and a training set sees a small part of the
        10^9 triples, so this is the law a model that has not memorized them can aim for: its test
        perplexity is the reference a trained model's is measured against, above the true one."""
        prev2, prev1 = self._check_context(prev2, prev1)
        w = self._weights(prev2, prev1, averaged=True)
        return w / w.sum(axis=1, keepdims=True)

    def _chunks(
        self, prev2: np.ndarray, prev1: np.ndarray, averaged: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Group the ``N`` contexts by distinct context and yield, chunk by chunk,
        ``(positions, row of each position in w, w (rows, V) unnormalized weights)``."""
        keys = prev2 * (self.vocab_size + 1) + prev1
        uniq, inverse = np.unique(keys, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(uniq) + 1))
        for r0 in range(0, len(uniq), _ROWS_PER_CHUNK):
            r1 = min(r0 + _ROWS_PER_CHUNK, len(uniq))
            ctx = uniq[r0:r1]
            w = self._weights(ctx // (self.vocab_size + 1), ctx % (self.vocab_size + 1), averaged)
            positions = order[bounds[r0] : bounds[r1]]
            yield positions, inverse[positions] - r0, w

    def _draw(self, prev2: np.ndarray, prev1: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse-CDF draw for uniforms ``u`` ``(N,)``: words ``(N,)`` in ``1..V`` and their log-probs."""
        words = np.empty(len(u), dtype=np.int64)
        logp = np.empty(len(u), dtype=np.float64)
        steps = int(np.ceil(np.log2(self.vocab_size))) + 1
        for positions, rows, w in self._chunks(prev2, prev1):
            cdf = np.cumsum(w, axis=1)
            total = cdf[:, -1]
            target = u[positions] * total[rows]
            # vectorized binary search: the smallest column whose cdf exceeds the target
            lo = np.zeros(len(positions), dtype=np.int64)
            hi = np.full(len(positions), self.vocab_size - 1, dtype=np.int64)
            for _ in range(steps):
                mid = (lo + hi) // 2
                right = cdf[rows, mid] <= target
                lo = np.where(right, mid + 1, lo)
                hi = np.where(right, hi, mid)
            words[positions] = lo + 1
            logp[positions] = np.log(w[rows, lo]) - np.log(total[rows])
        return words, logp

    def sample_next(self, prev2: np.ndarray, prev1: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``(N,)`` next words in ``1..V`` drawn from ``p(. | prev2, prev1)``, one uniform each."""
        prev2, prev1 = self._check_context(prev2, prev1)
        return self._draw(prev2, prev1, rng.random(len(prev1)))[0]

    def stream_starts(self, n_sentences: int) -> np.ndarray:
        """Rows of a split of ``n_sentences`` where the chain begins at the start context: every row
        (``restart``), or the first row of each of ``min(STREAMS, n)`` near-equal runs (``stream``)."""
        texts = n_sentences if self.rule == "restart" else min(STREAMS, n_sentences)
        return np.arange(texts, dtype=np.int64) * n_sentences // max(texts, 1)

    def sample_with_log_prob(self, n_sentences: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(n, L)`` sentences (a split, rows in file order) and ``(n, L)`` their true per-word natural-log
        probabilities given their past (:meth:`log_prob`).

        The texts of :meth:`stream_starts` are written side by side, word by word: one
        ``rng.random(texts)`` per word (``restart``: one per position of the ``n`` sentences).
        """
        length = self.sentence_length
        starts = self.stream_starts(n_sentences)
        sizes = np.diff(np.append(starts, n_sentences))
        steps = int(sizes.max(initial=0)) * length
        padded = np.zeros((len(starts), steps + 2), dtype=np.int64)
        logp = np.empty((len(starts), steps), dtype=np.float64)
        for t in range(steps):
            words, lp = self._draw(padded[:, t], padded[:, t + 1], rng.random(len(starts)))
            padded[:, t + 2] = words
            logp[:, t] = lp
        if n_sentences == 0:
            return np.zeros((0, length), dtype=np.int64), np.zeros((0, length), dtype=np.float64)
        words = np.concatenate([padded[r, 2 : 2 + m * length].reshape(m, length) for r, m in enumerate(sizes)])
        return words, np.concatenate([logp[r, : m * length].reshape(m, length) for r, m in enumerate(sizes)])

    def sample(self, n_sentences: int, rng: np.random.Generator) -> np.ndarray:
        """``(n, L)`` sentences of words in ``1..V``; same draws as :meth:`sample_with_log_prob`."""
        return self.sample_with_log_prob(n_sentences, rng)[0]

    def log_prob(self, sentences: np.ndarray, xi_averaged: bool = False) -> np.ndarray:
        """``(n, L)`` natural-log true probability of each word of a split ``(n, L)`` given its past: the
        words before it, back to the start context at the rows of :meth:`stream_starts`
        (``xi_averaged``: under :meth:`xi_averaged_probs` instead)."""
        sentences = np.asarray(sentences, dtype=np.int64)
        n, length = sentences.shape
        if sentences.size and (sentences.min() < 1 or sentences.max() > self.vocab_size):
            raise ValueError(f"sentence words must be in 1..{self.vocab_size}")
        flat = sentences.reshape(-1)
        prev1 = np.concatenate([[0], flat[:-1]])
        prev2 = np.concatenate([[0, 0], flat[:-2]])[: flat.size]
        begins = self.stream_starts(n) * length
        prev1[begins] = 0
        prev2[begins] = 0
        prev2[begins[begins + 1 < flat.size] + 1] = 0
        out = np.empty(flat.size, dtype=np.float64)
        for positions, rows, w in self._chunks(prev2, prev1, xi_averaged):
            out[positions] = np.log(w[rows, flat[positions] - 1]) - np.log(w.sum(axis=1)[rows])
        return out.reshape(n, length)


def _dirname(seed: int, sizes: tuple[int, int, int], rule: str) -> str:
    suffix = "" if tuple(sizes) == DEFAULT_SIZES else "-" + "-".join(str(s) for s in sizes)
    return f"synthetic-{seed}{suffix}" if rule == "restart" else f"synthetic-{rule}-{seed}{suffix}"


_FILES = ("train.txt", "valid.txt", "test.txt", "valid-logprob.npy", "test-logprob.npy", "vocab.txt")


def _generate(root: Path, seed: int, sizes: tuple[int, int, int], rule: str) -> None:
    """Sample the three splits and write them, with true log-probs and vocabulary, into ``root`` atomically.

    Sentences come from ``numpy.random.default_rng(seed)``: train, then valid, then test.
    """
    lang = TrigramLanguage(seed=seed, rule=rule)
    rng = np.random.default_rng(seed)
    names = np.array([""] + [f"w{k}" for k in range(1, lang.vocab_size + 1)], dtype=object)
    tmp = temp_sibling(root)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise ReglmError(
            f"cannot write the synthetic corpus under {root.parent} ({exc}); pass --data-dir with a writable directory"
        ) from None
    try:
        counts = np.zeros(lang.vocab_size + 1, dtype=np.int64)
        for split, n in zip(("train", "valid", "test"), sizes):
            sentences, logp = lang.sample_with_log_prob(n, rng)
            lines = [" ".join(row) for row in names[sentences].tolist()]
            (tmp / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
            if split == "train":
                counts += np.bincount(sentences.ravel(), minlength=lang.vocab_size + 1)
            else:
                np.save(tmp / f"{split}-logprob.npy", logp)
        counter = Counter({str(names[k]): int(counts[k]) for k in range(1, lang.vocab_size + 1)})
        counter[EOS] = sizes[0]
        Vocab.build(counter, min_freq=0).save(tmp / "vocab.txt")
        try:
            os.replace(tmp, root)
        except OSError as exc:  # another process may have finished the same corpus first
            if not all((root / f).is_file() for f in _FILES):
                raise ReglmError(
                    f"cannot move the synthetic corpus into {root} ({exc}); remove {root} or pass --data-dir"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def synthetic_corpus(
    seed: int = 0, data_dir: str | Path | None = None, sizes: tuple[int, int, int] = DEFAULT_SIZES, rule: str = "stream"
) -> Corpus:
    """The synthetic corpus of ``seed`` and ``rule``, generated once into ``<cache>/synthetic-stream-<seed>/``
    (``restart``: ``synthetic-<seed>/``) and then read from there.

    ``sizes`` are the train / valid / test sentence counts (the paper's 80k / 10k / 10k by
    default; other sizes get their own directory, ``...-<seed>-<train>-<valid>-<test>``).
    The vocabulary is closed: all words plus ``<eos>``, ordered by training count (no ``<unk>``).
    ``Corpus.truth`` holds the true log-probabilities of valid and test, aligned with the id
    streams (0.0 at every ``<eos>``).
    """
    if len(sizes) != 3 or min(sizes) < 1:
        raise ReglmError(f"synthetic sizes {sizes} must be three positive sentence counts")
    if rule not in RULES:
        raise ReglmError(f"unknown synthetic rule {rule!r}; choose one of {', '.join(RULES)}")
    root = cache_dir(data_dir) / _dirname(seed, sizes, rule)
    if not root.is_dir():
        _generate(root, seed, tuple(sizes), rule)
    missing = [f for f in _FILES if not (root / f).is_file()]
    if missing:
        raise ReglmError(
            f"synthetic corpus {root} lacks {', '.join(missing)}; delete the directory to generate it again"
        )
    corpus = load_directory(root, name="synthetic", vocab=Vocab.load(root / "vocab.txt"))
    truth = {}
    for split in ("valid", "test"):
        try:
            logp = np.load(root / f"{split}-logprob.npy")
        except (OSError, ValueError) as exc:
            raise ReglmError(
                f"{root / f'{split}-logprob.npy'} is unreadable ({exc}); delete {root} to generate it again"
            ) from None
        stream = np.concatenate([logp, np.zeros((logp.shape[0], 1))], axis=1).reshape(-1)
        if logp.ndim != 2 or stream.size != corpus.split(split).numel():
            raise ReglmError(
                f"{root / f'{split}-logprob.npy'} does not match {split}.txt; delete {root} to generate it again"
            )
        truth[split] = torch.from_numpy(stream)
    corpus.truth = truth
    return corpus


def synthetic_stats(
    corpus: Corpus, n_frequent: int = 50, n_almost: int = 100, language: TrigramLanguage | None = None
) -> dict:
    """Word-frequency shares and true test perplexities of a synthetic corpus (paper, section 4 / appendix A).

    Returns ``share_frequent`` / ``share_almost`` / ``share_rest``: share of training word tokens
    (``<eos>`` excluded) of the ``n_frequent`` most frequent training words, the next
    ``n_almost``, and the rest (paper: 70.5% / 14.7% / 14.8%); ``test_ppl``, ``test_ppl_frequent``,
    ``test_ppl_rare``: the true perplexity over test words (``<eos>`` targets excluded), over
    those among the ``n_frequent`` most frequent training words, and over the others, and
    ``ratio`` = rare / frequent (paper: 78.14, 29.74, 766.53, 25.8); ``test_ppl_se``: the standard
    error of ``test_ppl`` as an estimate of the language's perplexity (delta method over test
    sentences, each sentence's mean log-probability one observation). With the ``language`` the
    corpus was drawn from, also ``test_ppl_xi_averaged``: the test perplexity under
    :meth:`TrigramLanguage.xi_averaged_probs`, the reference for a trained model.
    """
    if corpus.truth is None:
        raise ReglmError(
            f"corpus {corpus.name!r} has no true probabilities; synthetic statistics need the synthetic corpus"
        )
    vocab = corpus.vocab
    word_ids = [i for i in range(len(vocab)) if vocab.itos[i] != EOS]
    ranked = sorted(word_ids, key=lambda i: (-vocab.counts[i], vocab.itos[i]))
    counts = np.array([vocab.counts[i] for i in ranked], dtype=np.float64)
    total = counts.sum()
    frequent = torch.zeros(len(vocab), dtype=torch.bool)
    frequent[ranked[:n_frequent]] = True
    test = corpus.test
    logp = corpus.truth["test"]
    words = test != vocab.eos_id

    def ppl(mask: torch.Tensor) -> float:
        return float(torch.exp(-logp[mask].mean()))

    stats = {
        "share_frequent": float(counts[:n_frequent].sum() / total),
        "share_almost": float(counts[n_frequent : n_frequent + n_almost].sum() / total),
        "share_rest": float(counts[n_frequent + n_almost :].sum() / total),
        "test_ppl": ppl(words),
        "test_ppl_frequent": ppl(words & frequent[test]),
        "test_ppl_rare": ppl(words & ~frequent[test]),
    }
    stats["ratio"] = stats["test_ppl_rare"] / stats["test_ppl_frequent"]
    sentence = torch.cumsum(~words, 0) - (~words).long()
    per_sentence = torch.bincount(sentence[words], weights=logp[words]) / torch.bincount(sentence[words])
    stats["test_ppl_se"] = stats["test_ppl"] * float(per_sentence.std() / math.sqrt(per_sentence.numel()))
    if language is not None:
        numbers = torch.tensor([int(w[1:]) if w != EOS else 0 for w in vocab.itos])
        sentences = numbers[test[words]].reshape(-1, language.sentence_length).numpy()
        stats["test_ppl_xi_averaged"] = float(np.exp(-language.log_prob(sentences, xi_averaged=True).mean()))
    return stats
