"""The loss the best discriminator of a model could reach on the synthetic corpus, from the truth.

Popov & Kudinov's discriminator (eq. 5) tells data tokens (drawn from p) from model tokens (drawn
from q) in each context; its loss is at least ``2 log 2 - 2 JS(p || q)`` per token, reached by
``r = p / (p + q)``. On the synthetic corpus p is known, so this bound is computed exactly: for
every position of the first ``--sentences`` validation sentences, the model's next-token
distribution (read as one stream from a zero state) against the true one (the trigram law over
the 1,000 words; probability 1 for ``<eos>`` after a sentence's 10th word). A discriminator whose
validation loss stays near ``log 4`` while this bound is well below it is undertrained.

Usage: ``python benchmarks/discriminator_optimum.py MODEL_DIR [MODEL_DIR ...] [--sentences 600]
[--out FILE]``; a model directory of a run on ``data.name=synthetic`` (a study's ``initial/best``,
``perturbed``). Writes ``benchmarks/results/popov-1/discriminator-optimum.json`` by default.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from reglm.data import load_corpus
from reglm.data.synthetic import TrigramLanguage
from reglm.data.vocab import EOS
from reglm.modeldir import load_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, environment, save  # noqa: E402


def true_next(lang: TrigramLanguage, itos: list[str], ids: np.ndarray) -> np.ndarray:
    """``(T - 1, V)``: the true distribution of the token after each of ``ids[:-1]``, a split's
    opening sentences (the chain starts at the start context at ``ids[0]``'s sentence)."""
    numbers = np.array([0 if token == EOS else int(token[1:]) for token in itos])
    words = numbers[ids]
    columns = np.array([itos.index(f"w{k}") for k in range(1, lang.vocab_size + 1)])
    eos = itos.index(EOS)
    emitted = words[words > 0]
    index = np.cumsum(words > 0) - 1
    dist = np.zeros((len(ids) - 1, len(itos)))
    targets = np.nonzero(words[1:] > 0)[0]
    dist[words[1:] == 0, eos] = 1.0
    position = index[targets + 1]
    prev1 = np.where(position >= 1, emitted[np.maximum(position - 1, 0)], 0)
    prev2 = np.where(position >= 2, emitted[np.maximum(position - 2, 0)], 0)
    dist[targets[:, None], columns[None, :]] = lang.next_word_probs(prev2, prev1)
    return dist


def optimum(model_dir: str, sentences: int) -> dict[str, float]:
    """Mean JS(p || q) per token and the bound ``2 log 2 - 2 JS`` for one model."""
    model, config, vocab = load_model_dir(model_dir, torch.device("cpu"))
    if config.data.name != "synthetic":
        raise SystemExit(f"{model_dir} was trained on {config.data.name!r}; the bound needs the synthetic corpus")
    corpus = load_corpus(config)
    lang = TrigramLanguage(seed=config.data.synthetic_seed, rule=config.data.synthetic_rule)
    restart = lang.stream_starts(int((corpus.valid == vocab.eos_id).sum()))
    if len(restart) > 1 and sentences > restart[1]:
        raise SystemExit(f"--sentences {sentences}: the validation split's second text starts at {restart[1]}")
    ids = corpus.valid[: sentences * (lang.sentence_length + 1)]
    p = true_next(lang, vocab.itos, ids.numpy())
    truth = corpus.truth["valid"][1 : len(ids)].numpy()
    if not np.allclose(np.log(p[np.arange(len(p)), ids[1:].numpy()]), truth):
        raise SystemExit("the contexts rebuilt here disagree with the corpus's true log-probabilities")
    model.eval()
    with torch.no_grad():
        q = model.log_probs(ids.unsqueeze(0))[0][0, :-1].double().exp().numpy()
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        js = 0.5 * (np.where(p > 0, p * np.log(p / m), 0).sum(1) + np.where(q > 0, q * np.log(q / m), 0).sum(1))
    return {"tokens": len(p), "js": float(js.mean()), "optimal_loss": 2 * math.log(2) - 2 * float(js.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", help="model directories of runs on the synthetic corpus")
    parser.add_argument("--sentences", type=int, default=600, help="opening validation sentences (default 600)")
    parser.add_argument("--out", type=Path, default=RESULTS / "popov-1" / "discriminator-optimum.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for model_dir in args.models:
        results[model_dir] = optimum(model_dir, args.sentences)
        r = results[model_dir]
        print(
            f"{model_dir}: JS {r['js']:.5f} nats a token, best discriminator loss {r['optimal_loss']:.5f}", flush=True
        )
    record = {
        **environment(torch.device("cpu"), __file__, None),
        "options": {"sentences": args.sentences},
        "log_4": 2 * math.log(2),
        "models": results,
    }
    save(record, args.out)


if __name__ == "__main__":
    main()
