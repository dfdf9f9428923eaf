"""Readings of Popov & Kudinov's (2019) appendix A, measured against the paper's corpus statistics.

The appendix gives the trigram law but not how a sentence starts nor how ``xi`` enters the two
beta factors. Each reading below samples a training and a test set and reports what the paper
reports of its corpus: the training-token shares of the 50 most frequent words, the next 100 and
the rest (paper: 70.5 / 14.7 / 14.8 %), and the true test perplexity over words, over the 50
frequent words and over the rest, with their ratio (paper: 78.14, 29.74, 766.53, 25.8). The
perplexity's standard error is over test sentences (each sentence's mean log-probability one
observation). Readings:

* ``restart``, ``stream``: the two rules of :mod:`reglm.data.synthetic`, as the corpus writes them.
* ``<xi>-burn-in``: every sentence continues ``--burn-in`` unemitted words of the chain (its
  stationary law); ``xi`` ``shared`` (one per triple, both beta factors) or ``own`` (a draw per
  factor) or ``pair`` (``xi_ij`` in ``beta(i, j)``, ``xi_kj`` in ``beta(k, j)``: ``beta(i, j)``
  then cancels and the chain is a bigram one).
* ``<xi>-start-word-0``: the start token is word 0 of the formula (its ``i`` factor dropped), so
  the first word is drawn from ``beta(k, 0)``; then as ``restart``.

Usage: ``python benchmarks/synthetic_readings.py [--train 40000] [--test 10000] [--burn-in 30]``;
writes ``benchmarks/results/synthetic-readings.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from reglm.data.synthetic import PAPER_STATS, TrigramLanguage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, environment, save  # noqa: E402


class Reading(TrigramLanguage):
    """A trigram language whose ``xi`` use and start law are those of one reading."""

    def __init__(self, xi_use: str, start: str, burn_in: int) -> None:
        super().__init__(seed=0, rule="stream" if xi_use == "own" else "restart")
        self.xi_use, self.start, self.burn_in = xi_use, start, burn_in

    def _weights(self, prev2: np.ndarray, prev1: np.ndarray) -> np.ndarray:
        if self.xi_use != "pair":
            w = super()._weights(prev2, prev1)
        else:
            k = self._words[None, :]
            j = prev1[:, None]
            w = self._pow[np.abs(k - j + self.xi(0, j, k)) + 1] * self._pow[k] * np.ones((len(prev1), 1))
            w[prev1 == 0] = self.alpha()
        if self.start == "word-0":
            first = (prev1 == 0) & (prev2 == 0)
            k = self._words
            w[first] = self._pow[np.abs(k + self.xi(0, 0, k)) + 1] * self._pow[k]
        return w

    def sample_with_log_prob(self, n_sentences: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        prev2 = np.zeros(n_sentences, dtype=np.int64)
        prev1 = np.zeros(n_sentences, dtype=np.int64)
        words = np.empty((n_sentences, self.sentence_length), dtype=np.int64)
        logp = np.empty((n_sentences, self.sentence_length))
        for t in range(self.burn_in + self.sentence_length):
            w, lp = self._draw(prev2, prev1, rng.random(n_sentences))
            if t >= self.burn_in:
                words[:, t - self.burn_in], logp[:, t - self.burn_in] = w, lp
            prev2, prev1 = prev1, w
        return words, logp


def statistics(train: np.ndarray, test: np.ndarray, test_logp: np.ndarray, vocab_size: int = 1000) -> dict[str, float]:
    counts = np.bincount(train.ravel(), minlength=vocab_size + 1)[1:]
    ranked = np.argsort(-counts, kind="stable")
    shares = counts[ranked] / counts.sum()
    frequent = np.zeros(vocab_size + 1, dtype=bool)
    frequent[ranked[:50] + 1] = True
    nll = -test_logp.ravel()
    is_frequent = frequent[test.ravel()]
    ppl = float(np.exp(nll.mean()))
    per_sentence = -test_logp.mean(axis=1)
    out = {
        "share_frequent": float(shares[:50].sum()),
        "share_almost": float(shares[50:150].sum()),
        "share_rest": float(shares[150:].sum()),
        "test_ppl": ppl,
        "test_ppl_se": ppl * float(per_sentence.std(ddof=1) / np.sqrt(len(per_sentence))),
        "test_ppl_frequent": float(np.exp(nll[is_frequent].mean())),
        "test_ppl_rare": float(np.exp(nll[~is_frequent].mean())),
    }
    out["ratio"] = out["test_ppl_rare"] / out["test_ppl_frequent"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=40000, help="training sentences sampled per reading")
    parser.add_argument("--test", type=int, default=10000, help="test sentences sampled per reading")
    parser.add_argument(
        "--burn-in", type=int, default=30, help="unemitted words before each sentence (burn-in readings)"
    )
    args = parser.parse_args()
    readings = {
        "restart": TrigramLanguage(seed=0, rule="restart"),
        "stream": TrigramLanguage(seed=0, rule="stream"),
        "shared-burn-in": Reading("shared", "alpha", args.burn_in),
        "own-burn-in": Reading("own", "alpha", args.burn_in),
        "pair-burn-in": Reading("pair", "alpha", args.burn_in),
        "shared-start-word-0": Reading("shared", "word-0", 0),
        "own-start-word-0": Reading("own", "word-0", 0),
    }
    results = {}
    for name, lang in readings.items():
        start = time.perf_counter()
        rng = np.random.default_rng(1)
        train, _ = lang.sample_with_log_prob(args.train, rng)
        test, logp = lang.sample_with_log_prob(args.test, rng)
        results[name] = statistics(train, test, logp) | {"seconds": time.perf_counter() - start}
        s = results[name]
        print(
            f"{name:20s} shares {100 * s['share_frequent']:.1f} / {100 * s['share_almost']:.1f} / "
            f"{100 * s['share_rest']:.1f} %  "
            f"ppl {s['test_ppl']:.2f} ± {s['test_ppl_se']:.2f}  frequent {s['test_ppl_frequent']:.2f}  "
            f"rare {s['test_ppl_rare']:.2f}  ratio {s['ratio']:.1f}",
            flush=True,
        )
    record = {
        **environment(torch.device("cpu"), __file__, None),
        "options": vars(args),
        "paper": PAPER_STATS,
        "readings": results,
    }
    save(record, RESULTS / "synthetic-readings.json")


if __name__ == "__main__":
    main()
