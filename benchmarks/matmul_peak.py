"""The CPU's float32 matrix-product rate at 1 and 2 threads: the ceiling the CPU benchmarks' ratios
are read against.

``--size`` x ``--size`` float32 ``torch.mm``, ``--repeats`` calls per thread count, the thread
counts alternating call by call; reports the best (the peak the machine gave) and the median
GFLOP/s (``2 n^3`` flops per call) with the load average before and after.

    python benchmarks/matmul_peak.py --size 2048 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from harness import RESULTS, environment, save


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--note", default=None, help="free text stored with the result (e.g. the machine's load)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/matmul-peak-cpu.json")
    args = parser.parse_args(argv)
    counts = [int(t) for t in args.threads.split(",")]
    a, b = torch.randn(args.size, args.size), torch.randn(args.size, args.size)
    load_before = os.getloadavg()
    seconds: dict[int, list[float]] = {t: [] for t in counts}
    for r in range(args.repeats + 1):
        for t in counts if r % 2 == 0 else counts[::-1]:
            torch.set_num_threads(t)
            start = time.perf_counter()
            torch.mm(a, b)
            if r > 0:
                seconds[t].append(time.perf_counter() - start)
    flops = 2 * args.size**3
    result = {
        "benchmark": "float32 torch.mm rate",
        **environment(torch.device("cpu"), "matmul_peak.py", argv),
        "note": args.note,
        "size": args.size,
        "repeats": args.repeats,
        "load_average_before": load_before,
        "results": {
            str(t): {"best_gflops": flops / min(v) / 1e9, "median_gflops": flops / statistics.median(v) / 1e9}
            for t, v in seconds.items()
        },
    }
    save(result, args.out or RESULTS / "matmul-peak-cpu.json")
    return result


if __name__ == "__main__":
    main()
