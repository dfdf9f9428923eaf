"""Everything this project wants to know from a GPU, in one call of at most eight minutes.

Run through ``benchmarks/gpu_check.sh`` (``PYTHONPATH=src``, no network, no install). Stages, in
order, each with its own time budget; a stage that fails is recorded with its error and the
next one runs:

1. ``smoke``: every model family trains 20 steps and is evaluated on the device, in fp32 and in
   bf16 (``train.precision``), on the synthetic corpus;
2. ``cuda-tests``: the test suite's CUDA tests (``pytest -m cuda``) when pytest is importable;
3. the benchmark scripts' ratios, each measured side by side in one process: the regularized
   AWD-LSTM against a plain cuDNN ``nn.LSTM`` (``throughput``), the adversarial softmax's
   overhead, the neural cache and dynamic evaluation against plain evaluation, MoS against
   softmax, the VD-LSTM's costs, the QRNN against the AWD-LSTM, the Transformer body's MFU, the
   adaptive input/softmax configurations, sentence scoring;
4. ``awd-lstm-ptb-epoch``: seconds per epoch of the ``awd-lstm-ptb`` recipe, from the tokens/s of
   its first optimizer steps (the training split's tokens / tokens/s);
5. ``ptb-curve``: ``awd-lstm-ptb`` trained for the minutes left (stopped by SIGTERM, which
   checkpoints), its validation perplexity per epoch; then the ``vd-lstm-ptb-small*`` cells of
   Inan et al.'s Table 1 while time remains.

The stages that read PTB look for it in ``$REGLM_SHARED_DATA``, ``shared/data`` in the
repository, then ``../shared/data``; without it they are skipped with that reason. The result
is one JSON (device, versions, command, every stage's numbers) in ``$OUT`` (default
``benchmarks/results/``), rewritten after every stage, and a summary table on standard output.
``--dry-run`` runs every stage on the CPU at tiny sizes (seconds each), so the script is known to
work before a GPU is at hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

from harness import environment  # noqa: E402

BUDGET_S = 470
"""The whole check, in seconds (the device allows 10 minutes a command; the issue asks for 8)."""

FAMILIES = {
    "awd-lstm": ("tiny", []),
    "awd-lstm-advsoft": ("advsoft-tiny", []),
    "vd-lstm": ("tiny", ["model.encoder=vd-lstm", "model.output.tie_weights=false"]),
    "qrnn": ("qrnn-tiny", []),
    "mos": ("mos-tiny", []),
    "doc": ("mos-tiny", ["model.output=doc", "model.output.doc_experts=2"]),
    "transformer-adaptive": ("transformer-tiny", []),
    "transformer-char-cnn": (
        "transformer-tiny",
        ["model.input=char-cnn", "model.output=softmax", "model.output.tie_weights=false"],
    ),
}
"""Every input / encoder / output family, at test sizes (the CUDA tests' list)."""

SUMMARY_KEYS = (
    "ratio",
    "overhead",
    "speedup",
    "meets",
    "tokens_per_s",
    "mfu",
    "seconds_per_epoch",
    "valid_ppl",
    "passed",
    "failed",
    "error",
    "skipped",
)


def ptb_dir() -> Path | None:
    """The directory holding ``ptb/``, or None."""
    for candidate in (os.environ.get("REGLM_SHARED_DATA"), REPO / "shared" / "data", REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "ptb" / "train.txt").is_file():
            return Path(candidate)
    return None


class Check:
    """The run: device, sizes, the deadline, the result written after every stage."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.dry = args.dry_run
        self.device = torch.device("cpu" if self.dry else args.device)
        self.start = time.monotonic()
        self.budget = args.budget
        self.work = Path(tempfile.mkdtemp(prefix="reglm-gpu-check-"))
        self.data = ptb_dir()
        out_dir = Path(os.environ.get("OUT") or BENCH / "results")
        self.path = args.out or out_dir / f"gpu-check-{self.device.type}{'-dry-run' if self.dry else ''}.json"
        self.result: dict[str, Any] = {
            "benchmark": "gpu check: CUDA smoke of every family, the benchmarks' ratios, awd-lstm-ptb epoch time "
            "and curve",
            **environment(self.device, "benchmarks/gpu_check.sh", argv),
            "dry_run": self.dry,
            "ptb": str(self.data) if self.data else None,
            "stages": {},
        }

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.start)

    def run(self, name: str, seconds: float, stage: Callable[[Check, float], dict[str, Any]]) -> None:
        """Run one stage if its budget still fits; record its numbers, or why it did not run."""
        began = time.monotonic()
        if self.left() < seconds * 0.5:
            record: dict[str, Any] = {
                "skipped": f"{self.left():.0f} s left of the budget, the stage needs about {seconds:.0f} s"
            }
        else:
            try:
                record = stage(self, min(seconds, self.left()))
            except Exception as exc:  # one broken stage must not cost the others their minutes
                record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=4)}
        record["seconds"] = round(time.monotonic() - began, 1)
        self.result["stages"][name] = record
        self.save()
        status = record.get("error") or record.get("skipped") or "ok"
        print(f"[gpu-check] {name}: {status} ({record['seconds']} s, {self.left():.0f} s left)", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)

    def reglm(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """``python -m reglm ARGV`` from the working tree, its output captured."""
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "REGLM_DATA_DIR": str(self.work / "data"),
        }
        return subprocess.run(
            [sys.executable, "-m", "reglm", *argv],
            cwd=self.work,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


# --------------------------------------------------------------------------------------- stages


def smoke(check: Check, _seconds: float) -> dict[str, Any]:
    from reglm.config import build_config
    from reglm.train.run import train

    os.environ["REGLM_DATA_DIR"] = str(check.work / "data")
    steps = 3 if check.dry else 20
    families = dict(list(FAMILIES.items())[:3]) if check.dry else FAMILIES
    out: dict[str, Any] = {}
    for family, (preset, overrides) in families.items():
        for precision in ("fp32",) if check.dry else ("fp32", "bf16"):
            small = [
                f"data.synthetic_sentences={100 if check.dry else 200}",
                f"train.max_steps={steps}",
                "train.finetune=false",
                "train.epochs=1",
            ]
            config = build_config(
                preset, [*overrides, *small, f"train.device={check.device}", f"train.precision={precision}"]
            )
            results = train(config, check.work / f"smoke-{family}-{precision}", progress=False)
            finite = all(math.isfinite(results[split]["loss"]) for split in ("valid", "test"))
            out[f"{family}/{precision}"] = {"valid_ppl": results["valid"]["ppl"], "finite": finite}
    out["passed"] = sum(v["finite"] for v in out.values())
    out["failed"] = len(out) - 1 - out["passed"]
    return out


def cuda_tests(check: Check, seconds: float) -> dict[str, Any]:
    if check.dry:
        return {"skipped": "dry run: the CUDA tests skip on a CPU"}
    try:
        import pytest  # noqa: F401
    except ImportError:
        return {"skipped": "pytest is not installed on this machine"}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-o", "addopts=", "-p", "no:cacheprovider", "tests"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=seconds,
    )
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    counts = {
        word: int(n)
        for n, word in (
            part.split()[:2]
            for part in tail[0].replace(" in ", ", ").split(", ")
            if part.split()[:1] and part.split()[0].isdigit()
        )
    }
    return {
        "exit_code": proc.returncode,
        "passed": counts.get("passed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0),
        "summary": tail[0],
        "failures": proc.stdout[-3000:] if proc.returncode else "",
    }


def benchmark(
    script: str, full: list[str], dry: list[str], needs_ptb: bool = False
) -> Callable[[Check, float], dict[str, Any]]:
    """A stage that runs ``benchmarks/SCRIPT.py`` in this process and keeps its result."""

    def stage(check: Check, _seconds: float) -> dict[str, Any]:
        if not (BENCH / f"{script}.py").is_file():
            return {"skipped": f"benchmarks/{script}.py is not in this tree"}
        if needs_ptb and check.data is None:
            return {"skipped": "no PTB data (set REGLM_SHARED_DATA, or put ptb/ under shared/data)"}
        out = check.work / f"{script}.json"
        argv = [*(dry if check.dry else full), "--device", str(check.device), "--out", str(out)]
        if needs_ptb:
            argv += ["--data-dir", str(check.data)]
        module = __import__(script)
        with open(check.work / f"{script}.log", "w", encoding="utf-8") as log, contextlib.redirect_stdout(log):
            module.main(argv)
        return json.loads(out.read_text())

    return stage


def _ptb_run(check: Check, overrides: list[str]) -> list[str]:
    preset = "tiny" if check.dry else "awd-lstm-ptb"
    data = ["data.synthetic_sentences=100"] if check.dry else ["data.name=ptb", f"data.data_dir={check.data}"]
    return ["train", "--preset", preset, *data, f"train.device={check.device}", "train.finetune=false", *overrides]


def epoch_time(check: Check, seconds: float) -> dict[str, Any]:
    if check.data is None and not check.dry:
        return {"skipped": "no PTB data (set REGLM_SHARED_DATA, or put ptb/ under shared/data)"}
    steps, interval = (6, 2) if check.dry else (120, 20)
    run = check.work / "epoch"
    proc = check.reglm(
        [*_ptb_run(check, [f"train.max_steps={steps}", f"train.log_interval={interval}"]), "--out", str(run)], seconds
    )
    if proc.returncode != 0:
        return {"error": f"reglm train exited {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s"] for e in events if e.get("event") == "step"][1:]  # the first interval warms up
    from reglm.config import build_config
    from reglm.data import load_corpus

    config = build_config(
        "tiny" if check.dry else "awd-lstm-ptb",
        ["data.synthetic_sentences=100"] if check.dry else ["data.name=ptb", f"data.data_dir={check.data}"],
    )
    train_tokens = int(load_corpus(config).train.numel())
    rate = sum(rates) / len(rates) if rates else float("nan")
    return {
        "steps": steps,
        "train_tokens": train_tokens,
        "tokens_per_s": rate,
        "seconds_per_epoch": train_tokens / rate,
        "reference_seconds_per_epoch": 65.0,
        "reference_device": "Quadro GP100 (AWD-LSTM paper)",
        "target_seconds_per_epoch": 10.0,
    }


def _trained_for(check: Check, argv: list[str], run: Path, seconds: float) -> list[dict[str, Any]]:
    """``reglm ARGV`` for ``seconds``, then SIGTERM (a checkpoint, then exit); its epoch events."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "REGLM_DATA_DIR": str(check.work / "data")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "reglm", *argv, "--out", str(run)],
        cwd=check.work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    metrics = run / "metrics.jsonl"
    events = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return [
        {"epoch": e["epoch"], "valid_ppl": e["valid_ppl"], "time": e["time"]}
        for e in events
        if e.get("event") == "epoch"
    ]


def ptb_curve(check: Check, seconds: float) -> dict[str, Any]:
    if check.data is None and not check.dry:
        return {"skipped": "no PTB data (set REGLM_SHARED_DATA, or put ptb/ under shared/data)"}
    # the dry run trains one tiny epoch to its end (the stop by SIGTERM is the GPU run's path)
    main_share = 90 if check.dry else seconds * 0.6 - 5
    curve = _trained_for(
        check, _ptb_run(check, ["train.epochs=1"] if check.dry else []), check.work / "curve", main_share
    )
    out: dict[str, Any] = {"awd-lstm-ptb": curve, "valid_ppl": curve[-1]["valid_ppl"] if curve else None}
    if check.dry:
        return out
    for cell in ("vd-lstm-ptb-small", "vd-lstm-ptb-small-re", "vd-lstm-ptb-small-al", "vd-lstm-ptb-small-real"):
        if check.left() < 45:
            out[cell] = "not run: time is up"
            continue
        argv = [
            "train",
            "--preset",
            cell,
            "data.name=ptb",
            f"data.data_dir={check.data}",
            f"train.device={check.device}",
        ]
        out[cell] = _trained_for(check, argv, check.work / cell, min(check.left() - 25, seconds * 0.1))
    return out


STAGES: list[tuple[str, float, Callable[[Check, float], dict[str, Any]]]] = [
    ("smoke", 70, smoke),
    ("cuda-tests", 90, cuda_tests),
    (
        "throughput",
        25,
        benchmark(
            "throughput",
            ["--preset-size", "ptb", "--steps", "100"],
            ["--preset-size", "tiny", "--steps", "2", "--warmup", "1", "--rounds", "1"],
        ),
    ),
    (
        "advsoft-overhead",
        30,
        benchmark(
            "advsoft_overhead",
            ["--steps", "60"],
            [
                "--preset-size",
                "tiny",
                "--vocab-sizes",
                "200",
                "--steps",
                "2",
                "--output-repeats",
                "1",
                "--warmup",
                "1",
                "--rounds",
                "1",
            ],
        ),
    ),
    (
        "cache-eval",
        25,
        benchmark(
            "cache_eval",
            ["--tokens", "20000"],
            [
                "--tokens",
                "400",
                "--emb-size",
                "16",
                "--hidden-size",
                "16",
                "--layers",
                "1",
                "--window",
                "50",
                "--bptt",
                "35",
                "--passes",
                "1",
                "--rounds",
                "1",
                "--reference-tokens",
                "70",
            ],
            needs_ptb=True,
        ),
    ),
    (
        "dynamic-eval",
        30,
        benchmark(
            "dynamic_eval",
            ["--sizes", "ptb", "--tokens", "2000", "--rounds", "2"],
            [
                "--sizes",
                "reduced",
                "--tokens",
                "200",
                "--stats-tokens",
                "100",
                "--segments",
                "2",
                "--warmup",
                "0",
                "--rounds",
                "1",
            ],
            needs_ptb=True,
        ),
    ),
    (
        "mos-throughput",
        20,
        benchmark(
            "mos_throughput",
            ["--steps", "50"],
            ["--batch-size", "4", "--bptt", "10", "--experts", "2", "--steps", "2", "--warmup", "1", "--rounds", "1"],
        ),
    ),
    (
        "vd-lstm-costs",
        30,
        benchmark(
            "vd_lstm_costs",
            ["--size", "medium", "--steps", "60"],
            ["--size", "small", "--vocab-sizes", "1000", "--steps", "2", "--warmup", "1", "--rounds", "1"],
        ),
    ),
    ("qrnn", 25, benchmark("qrnn", [], ["--dry-run"])),
    ("transformer-body", 30, benchmark("transformer_body", ["--precision", "bf16"], ["--dry-run"])),
    (
        "adaptive",
        40,
        benchmark(
            "adaptive",
            ["--precision", "bf16", "--steps", "8", "--rounds", "2"],
            [
                "--configs",
                "ADP-T",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--rounds",
                "1",
                "--memory-steps",
                "1",
                "--batch-size",
                "1",
                "--bptt",
                "8",
                "--softmax-steps",
                "1",
                "--softmax-tokens",
                "64",
                "--softmax-features",
                "64",
                "--layers",
                "1",
                "--override",
                "model.encoder.d_model=64",
                "--override",
                "model.encoder.ffn_dim=128",
                "--override",
                "model.encoder.heads=2",
                "--override",
                "model.input.dim=64",
            ],
        ),
    ),
    (
        "score-throughput",
        40,
        benchmark(
            "score_throughput",
            ["--sentences", "1000", "--passes", "2"],
            ["--preset", "tiny", "--sentences", "20", "--passes", "1"],
            needs_ptb=True,
        ),
    ),
    ("awd-lstm-ptb-epoch", 50, epoch_time),
    ("ptb-curve", 600, ptb_curve),
]


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(stage, key, value)`` for the numbers a reader looks for first (ratios, targets met, rates)."""
    rows = []

    def walk(stage: str, value: Any, path: str) -> None:
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if items is not None:
            for key, item in items:
                walk(stage, item, f"{path}.{key}" if path else str(key))
            return
        leaf = path.rsplit(".", 1)[-1]
        if (
            isinstance(value, (int, float, str, bool))
            and any(k in leaf for k in SUMMARY_KEYS)
            and not leaf.startswith(("target", "paper", "reference"))
        ):
            rows.append((stage, path, value))

    for stage, record in result["stages"].items():
        walk(stage, {k: v for k, v in record.items() if k != "traceback"}, "")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dry-run", action="store_true", help="every stage on the CPU at tiny sizes: checks the script"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help=f"seconds for the whole check (default {BUDGET_S}; dry run 300)"
    )
    parser.add_argument("--only", help="comma-separated stages to run (default: all)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result file (default: $OUT/gpu-check-<device>.json, $OUT defaulting to benchmarks/results/)",
    )
    args = parser.parse_args(argv)
    args.budget = args.budget or (300.0 if args.dry_run else BUDGET_S)
    names = [name for name, _, _ in STAGES]
    chosen = names if args.only is None else args.only.split(",")
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if not args.dry_run and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; run with --dry-run to check the script on the CPU")
    check = Check(args, sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        torch.set_num_threads(1)
    for name, seconds, stage in STAGES:
        if name in chosen:
            run_seconds = max(5.0, check.left() - 20) if name == "ptb-curve" else seconds
            check.run(name, run_seconds, stage)
    print(f"\n{'stage':20s} {'measure':58s} value")
    for stage, key, value in summary_rows(check.result):
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{stage:20s} {key[:58]:58s} {shown[:80]}")
    print(f"\nwrote {check.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
