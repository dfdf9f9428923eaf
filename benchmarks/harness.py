"""Shared pieces of the benchmark scripts: interleaved timing, device description, result files.

Every benchmark measures its contenders in one process, interleaved: a warm-up, then timed
rounds that alternate which contender goes first, synchronizing CUDA around every timed block,
so that machine noise hits both sides alike and the reported ratio is meaningful.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timed(step: Callable[[int], None], steps: int, offset: int, device: torch.device) -> float:
    """Seconds for ``step(offset + i)``, ``i < steps``, with the device synchronized around them."""
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(offset + i)
    sync(device)
    return time.perf_counter() - start


def interleaved(steps_of: dict[str, Callable[[int], None]], steps: int, rounds: int, warmup: int, device: torch.device) -> tuple[dict[str, float], dict[str, int]]:
    """Warm every contender up, then time ``steps`` steps of each split into ``rounds`` rounds
    whose order alternates. Returns (seconds, steps done) per contender."""
    for step in steps_of.values():
        timed(step, warmup, 0, device)
    names = list(steps_of)
    per_round = math.ceil(steps / rounds)
    seconds = {name: 0.0 for name in names}
    done = {name: 0 for name in names}
    for r in range(rounds):
        n = min(per_round, steps - done[names[0]])
        if n <= 0:
            break
        for name in names if r % 2 == 0 else names[::-1]:
            seconds[name] += timed(steps_of[name], n, done[name], device)
            done[name] += n
    return seconds, done


def random_batches(vocab: int, batch_size: int, bptt: int, seed: int, device: torch.device, count: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of uniformly random ids: ``(inputs, targets)``, each ``(batch_size, bptt)``,
    targets shifted by one, drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        seq = torch.randint(0, vocab, (batch_size, bptt + 1), generator=generator).to(device)
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return batches


def environment(device: torch.device, script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """Device, versions and the command line, for the head of a result file."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join([script, *argv]),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def save(result: dict[str, Any], path: Path) -> None:
    """Print ``result`` and write it to ``path`` as JSON."""
    print(json.dumps(result, indent=2))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
