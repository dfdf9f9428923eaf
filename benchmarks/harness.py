"""Shared pieces of the benchmark scripts: interleaved timing, device description, result files, peak memory.

Every benchmark measures its contenders in one process, interleaved: a warm-up, then timed
rounds that alternate which contender goes first, synchronizing CUDA around every timed block,
so that machine noise hits both sides alike and the reported ratio is meaningful.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import platform
import re
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

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


def interleaved(
    steps_of: dict[str, Callable[[int], None]], steps: int, rounds: int, warmup: int, device: torch.device
) -> tuple[dict[str, float], dict[str, int]]:
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


def random_batches(
    vocab: int, batch_size: int, bptt: int, seed: int, device: torch.device, count: int = 4
) -> list[tuple[torch.Tensor, torch.Tensor]]:
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


def autocast_of(device: torch.device, precision: str) -> Callable[[], Any]:
    """A context factory: bf16 autocast of the forward pass (``train.precision=bf16``), or nothing."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


class PeakMemory:
    """The transient peak of some steps over what was in use before them: on CUDA
    ``max_memory_allocated`` after ``reset_peak_memory_stats`` less what was allocated before; on
    a CPU the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``,
    after ``malloc_trim``) less its resident set before -- page-granular and including the
    allocator's slack, so an upper bound of the tensors' bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.libc = None
        if device.type == "cpu":
            try:
                self.libc = ctypes.CDLL("libc.so.6")
            except OSError:
                pass
            self.available = self._cpu_resettable()
        else:
            self.available = device.type == "cuda"

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return (
                "persistent bytes + (torch.cuda.max_memory_allocated after reset_peak_memory_stats - "
                "memory_allocated before)"
            )
        if self.available:
            return (
                "persistent bytes + (peak resident set VmHWM, reset via /proc/self/clear_refs, - resident set "
                "VmRSS before, after malloc_trim)"
            )
        return "unavailable on this platform (no resettable VmHWM); see state_bytes"

    @staticmethod
    def _status_kib(field: str) -> int:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))

    def _cpu_resettable(self) -> bool:
        try:
            self._status_kib("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except (OSError, AttributeError):
            return False

    def _settle(self) -> None:
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)

    def measure(self, run: Callable[[], None]) -> int | None:
        """Bytes by which ``run()``'s peak exceeds what was in use before it."""
        if not self.available:
            run()
            return None
        self._settle()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            run()
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - before
        before = self._status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        run()
        return max(0, self._status_kib("VmHWM") - before) * 1024


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct tensors among ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values())
