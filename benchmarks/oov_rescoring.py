"""Unknown words in n-best rescoring: how often a made-up word wins, under each ``--oov-penalty``.

For the first ``--sentences`` lines of a corpus's test split that hold no ``<unk>``, two
hypotheses: the sentence, and the sentence with its middle word replaced by ``xyzzyplugh`` (a
word of no vocabulary). Both are scored by a trained run (``lm.score_batch``, ``<eos>`` scored) under each setting
(``none``: the raw ``log p(<unk>)``; ``share``, the default; fixed penalties), and the share of
pairs where the correct sentence scores higher is reported, with the mean ``ln p(<unk>)`` the
model gives at the replaced position. The baseline is ``none``.

    python benchmarks/oov_rescoring.py runs/ptb --data ../shared/data/ptb --sentences 500
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from harness import RESULTS, environment, save

import reglm
from reglm.data.vocab import UNK

NONSENSE = "xyzzyplugh"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained run (or model directory) whose vocabulary has <unk>")
    parser.add_argument("--data", required=True, help="a corpus directory: its test.txt gives the sentences")
    parser.add_argument("--sentences", type=int, default=500)
    parser.add_argument("--penalties", default="5,10", help="fixed penalties to try (natural log)")
    args = parser.parse_args(argv)
    lm = reglm.load(args.run)
    lines = [line.strip() for line in (Path(args.data) / "test.txt").read_text(encoding="utf-8").splitlines()]
    correct = [line for line in lines if line and UNK not in line.split() and len(line.split()) >= 3][: args.sentences]
    nonsense = []
    for line in correct:
        words = line.split()
        words[len(words) // 2] = NONSENSE
        nonsense.append(" ".join(words))
    settings: list[str | float | None] = [None, "share", *(float(p) for p in args.penalties.split(","))]
    result = {
        **environment(torch.device("cpu"), "benchmarks/oov_rescoring.py", argv),
        "run": args.run,
        "pairs": len(correct),
        "unknown_types": lm.vocab.unknown_types(),
        "baseline": "none",
    }
    unk_scores = [lm.full_scores(s, oov_penalty=None)[len(s.split()) // 2].log_prob for s in nonsense[:100]]
    result["mean_ln_p_unk_at_the_word"] = statistics.fmean(unk_scores)
    result["settings"] = {}
    for setting in settings:
        good = lm.score_batch(correct, oov_penalty=setting)
        bad = lm.score_batch(nonsense, oov_penalty=setting)
        wins = sum(g > b for g, b in zip(good, bad))
        name = "none" if setting is None else str(setting)
        margin = statistics.fmean(g - b for g, b in zip(good, bad))
        result["settings"][name] = {"correct_wins": wins / len(correct), "mean_margin_nats": margin}
    save(result, RESULTS / "oov-rescoring-cpu.json")


if __name__ == "__main__":
    main()
