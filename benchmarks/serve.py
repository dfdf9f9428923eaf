"""Throughput and latency of ``reglm serve`` under concurrent clients, against offline scoring.

The AWD-LSTM PTB preset's architecture (random weights: the cost does not depend on them) is
saved as a model directory and served by ``reglm serve`` on 127.0.0.1 (a child process, the same
torch thread count as the offline side). The first ``--sentences`` lines of PTB test are sent as
requests of ``--per-request`` sentences (an n-best list) by 1, 8 and 32 concurrent clients (threads
with one httpx connection each), every request bounded by a timeout. Measured per client count:
sentences/s, and the p50/p99 latency of a request. The baseline: ``lm.score_batch`` of the
same sentences in one call (what ``reglm score`` runs, without reading the file), in this process,
measured just before each client count's run (the server idle meanwhile).
Target: throughput at 32 clients >= 0.7x the offline baseline. Every reply is checked against
the offline numbers.

    python benchmarks/serve.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from harness import RESULTS, environment, save

import reglm
from reglm.config import build_config
from reglm.data import resolve
from reglm.modeldir import save_model_dir
from reglm.models import LanguageModel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TARGET_OF_OFFLINE = 0.7


def start_server(model: Path, threads: int, log: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """``reglm serve`` on a free loopback port; returns the process and its URL."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(reglm.__file__).parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reglm", "serve", str(model), "--port", "0", *extra],
        stderr=log.open("w"),
        stdout=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 300
    while "serving" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start: {log.read_text()}")
        time.sleep(0.2)
    return proc, log.read_text().split(" on ", 1)[1].split()[0]


def load(
    url: str, requests: list[list[str]], clients: int, timeout: float
) -> tuple[float, list[float], list[list[float]]]:
    """Send ``requests`` from ``clients`` threads; returns (seconds, latencies, scores per request)."""
    scores: list[list[float]] = [[] for _ in requests]
    latencies: list[float] = [0.0] * len(requests)

    def client(first: int) -> None:
        with httpx.Client(base_url=url, timeout=timeout) as http:
            for i in range(first, len(requests), clients):
                start = time.perf_counter()
                reply = http.post("/score", json={"sentences": requests[i]})
                latencies[i] = time.perf_counter() - start
                reply.raise_for_status()
                scores[i] = [r["log_prob"] for r in reply.json()["results"]]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return time.perf_counter() - start, latencies, scores


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads of the server and of the offline baseline"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("REGLM_SHARED_DATA", SHARED_DATA)),
        help="directory holding ptb/ (default: ../shared/data)",
    )
    parser.add_argument("--preset", default="awd-lstm-ptb", help="the architecture served (random weights)")
    parser.add_argument("--sentences", type=int, default=800)
    parser.add_argument("--per-request", type=int, default=10, help="sentences per request (an n-best list)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent client counts, comma-separated")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--max-wait-ms", default="2", help="the server's --max-wait-ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/serve-cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = resolve("ptb", data_dir=args.data_dir)
    lines = (args.data_dir / "ptb" / "test.txt").read_text(encoding="utf-8").splitlines()[: args.sentences]
    requests = [lines[i : i + args.per_request] for i in range(0, len(lines), args.per_request)]
    env = environment(torch.device("cpu"), "serve.py", argv)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        config = build_config(args.preset, ["data.name=ptb"])
        save_model_dir(Path(tmp) / "model", LanguageModel(config.model, len(corpus.vocab)), config, corpus.vocab)
        lm = reglm.load(Path(tmp) / "model")

        def offline_rate() -> float:
            start = time.perf_counter()
            lm.score_batch(lines)
            return len(lines) / (time.perf_counter() - start)

        offline = lm.score_batch(lines)  # warm-up, and the numbers every reply must equal
        proc, url = start_server(
            Path(tmp) / "model", args.threads, Path(tmp) / "server.log", ["--max-wait-ms", args.max_wait_ms]
        )
        rows = {}
        try:
            load(url, requests[:4], 1, args.timeout)  # warm-up
            for clients in (int(c) for c in args.clients.split(",")):
                baseline = offline_rate()  # side by side: just before the clients' run, the server idle
                seconds, latencies, scores = load(url, requests, clients, args.timeout)
                served = [s for request in scores for s in request]
                gap = max(abs(a - b) for a, b in zip(served, offline))
                assert len(served) == len(lines) and gap < 1e-3, f"the server's scores differ from offline by {gap}"
                rows[str(clients)] = row = {
                    "sentences_per_s": len(lines) / seconds,
                    "requests_per_s": len(requests) / seconds,
                    "latency_p50_ms": 1000 * percentile(latencies, 50),
                    "latency_p99_ms": 1000 * percentile(latencies, 99),
                    "offline_sentences_per_s": baseline,
                    "of_offline": len(lines) / seconds / baseline,
                    "max_abs_difference_from_offline": gap,
                }
                print(
                    f"{clients} clients: {row['sentences_per_s']:.0f} sentences/s ({row['of_offline']:.2f}x offline), "
                    f"p50 {row['latency_p50_ms']:.0f} ms, p99 {row['latency_p99_ms']:.0f} ms",
                    flush=True,
                )
            health = httpx.get(f"{url}/health", timeout=args.timeout).json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    most = str(max(int(c) for c in args.clients.split(",")))
    result = {
        "benchmark": "reglm serve under concurrent clients vs offline batched scoring of the same sentences",
        **env,
        "load_average_end": os.getloadavg(),
        "model": {
            "preset": args.preset,
            "random_weights": True,
            "vocab_size": len(corpus.vocab),
            "parameters": lm.model.num_parameters(),
        },
        "data": {
            "corpus": "ptb",
            "split": "test",
            "sentences": len(lines),
            "tokens": sum(len(s.split()) + 1 for s in lines),
            "sentences_per_request": args.per_request,
            "requests": len(requests),
        },
        "server": {
            "max_wait_ms": float(args.max_wait_ms),
            "score_requests": health["score_requests"],
            "model_calls": health["model_calls"],
        },
        "clients": rows,
        "target": {"of_offline_at": int(most), "ratio": TARGET_OF_OFFLINE},
        "meets_target": rows[most]["of_offline"] >= TARGET_OF_OFFLINE,
    }
    save(result, args.out or RESULTS / "serve-cpu.json")
    return result


if __name__ == "__main__":
    main()
