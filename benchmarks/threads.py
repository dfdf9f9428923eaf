"""Torch CPU threads for reglm's commands: 1 against 2 threads, on an idle and on a loaded machine.

The job is a run's final test evaluation (what ``reglm train`` ends with and ``reglm eval --split
test`` does): the first ``--tokens`` tokens of PTB test in one stream (``test_batch_size=1``,
windows of 35) through the ``vd-lstm-ptb-small`` architecture (random weights: the cost does not
depend on them). Each thread count is timed in alternating rounds, first on the machine as it is,
then with ``--hogs`` busy-looping processes beside it (another job on a shared machine). The
baseline is 1 thread; the ratio is seconds with 2 threads over seconds with 1.

    python benchmarks/threads.py --tokens 20000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import torch
from harness import RESULTS, environment, save

from reglm.config import build_config
from reglm.data import resolve
from reglm.evaluate.perplexity import Reading, evaluate
from reglm.models import LanguageModel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _hog() -> None:
    while True:
        pass


def _time(model: LanguageModel, ids: torch.Tensor, threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    evaluate(model, ids, reading=Reading.streams(1, 35))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20000, help="tokens of PTB test to score")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per thread count and condition")
    parser.add_argument("--hogs", type=int, default=1, help="busy processes beside the job in the loaded condition")
    args = parser.parse_args(argv)
    corpus = resolve(str(SHARED_DATA / "ptb"))
    ids = corpus.test[: args.tokens]
    torch.manual_seed(0)
    model = LanguageModel(build_config("vd-lstm-ptb-small").model, len(corpus.vocab)).eval()
    result = {
        **environment(torch.device("cpu"), "benchmarks/threads.py", argv),
        "cpu_count": os.cpu_count(),
        "tokens": int(ids.numel()),
        "hogs": args.hogs,
    }
    _time(model, ids[:2000], 1)
    for condition in ("idle", "loaded"):
        count = args.hogs if condition == "loaded" else 0
        hogs = [multiprocessing.Process(target=_hog, daemon=True) for _ in range(count)]
        for hog in hogs:
            hog.start()
        seconds: dict[int, list[float]] = {1: [], 2: []}
        try:
            for r in range(args.rounds):
                for threads in (1, 2) if r % 2 == 0 else (2, 1):
                    seconds[threads].append(_time(model, ids, threads))
        finally:
            for hog in hogs:
                hog.terminate()
                hog.join()
        best = {threads: min(values) for threads, values in seconds.items()}
        result[condition] = {
            "load_average": os.getloadavg(),
            "seconds": {f"{t}_thread{'s' if t > 1 else ''}": v for t, v in seconds.items()},
            "tokens_per_s": {f"{t}_thread{'s' if t > 1 else ''}": ids.numel() / best[t] for t in best},
            "ratio_2_over_1": best[2] / best[1],
        }
    save(result, RESULTS / "threads-cpu.json")


if __name__ == "__main__":
    main()
