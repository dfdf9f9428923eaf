"""Progress of long work, one mechanism for every command: a tqdm bar on a terminal, else lines.

Without a terminal (a log file, a pipe, a batch job) a tracked loop prints a line to standard
error after its first :data:`FIRST` steps (unless it will end within :data:`INTERVAL` seconds)
and then at least every :data:`INTERVAL` seconds: what
runs, the position, the rate and an ETA. A command made of several passes (``reglm eval
--dynamic-search``: gradient statistics, one validation pass per grid point, the test pass)
declares their relative sizes up front with :func:`plan`; each tracked loop then takes the next
planned share, and the ETA is the whole command's. A loop outside a plan reports the ETA of that
loop alone and says so. The trainer prints its own lines (loss, learning rate) on the same
:class:`Pace`, with the ETA of the whole run.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

INTERVAL = 30.0
"""Seconds between two progress lines without a terminal (at most)."""
FIRST = 3
"""Steps after which the first progress line is printed (the rate is known from then on)."""


def clock(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS`` (``?`` when unknown, hours beyond a day)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Pace:
    """When the next progress line is due (after :data:`FIRST` steps, then every
    :data:`INTERVAL` seconds), and the ETA from the fraction of the work done since it started."""

    def __init__(self, start_fraction: float = 0.0) -> None:
        self.start = time.monotonic()
        self.start_fraction = start_fraction
        self.last: float | None = None

    def due(self, steps: int, eta: Callable[[], float] | None = None, force: bool = False) -> bool:
        """Whether to print a line now, ``steps`` steps after the start (marks it printed): the
        first after :data:`FIRST` steps unless ``eta()`` says the work ends within the interval;
        always with ``force`` (a line printed for another reason restarts the interval)."""
        now = time.monotonic()
        since = now - (self.start if self.last is None else self.last)
        early = self.last is None and steps == FIRST and (eta is None or eta() > INTERVAL)
        if force or since >= INTERVAL or early:
            self.last = now
            return True
        return False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def eta(self, fraction: float) -> float:
        """Seconds left when ``fraction`` of the work is done, at the pace since the start."""
        progressed = fraction - self.start_fraction
        if progressed <= 0:
            return math.inf
        return self.elapsed() * (1.0 - fraction) / progressed


class _Plan:
    """The planned passes of a command: their relative sizes, how many have begun."""

    def __init__(self, weights: Sequence[float]) -> None:
        total = float(sum(weights)) or 1.0
        self.shares = [w / total for w in weights]
        self.begun = 0
        self.pace = Pace()

    def take(self) -> tuple[float, float] | None:
        """``(fraction before, share)`` of the next pass; None once every planned pass has begun."""
        if self.begun >= len(self.shares):
            return None
        before = sum(self.shares[: self.begun])
        self.begun += 1
        return before, self.shares[self.begun - 1]


_plan: _Plan | None = None


@contextmanager
def plan(weights: Sequence[float]) -> Iterator[None]:
    """Within the block, the tracked loops are passes of one command of these relative sizes,
    in this order (e.g. tokens read per pass): the ETA they report is the whole command's."""
    global _plan
    previous, _plan = _plan, _Plan(weights)
    try:
        yield
    finally:
        _plan = previous


def track(
    iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "batch", enabled: bool = True
) -> Iterator[T]:
    """The items of ``iterable`` (``total`` of them), with progress shown when ``enabled``: a tqdm
    bar when standard error is a terminal, else lines (see the module doc)."""
    if not enabled:
        yield from iterable
        return
    share = _plan.take() if _plan is not None else None
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc, leave=False, unit=unit)
        return
    pace, steps = Pace(), 0
    for item in iterable:
        yield item
        steps += 1
        if pace.due(steps, (lambda: pace.eta(steps / total)) if total else None):
            say(line(desc, steps, total, unit, pace, share))


def line(desc: str, steps: int, total: int | None, unit: str, pace: Pace, share: tuple[float, float] | None) -> str:
    """One progress line of a tracked loop ``steps`` steps in."""
    rate = _rate(steps / max(pace.elapsed(), 1e-9))
    where = f"{steps}/{total} {unit} ({steps / total:.0%})" if total else f"{steps} {unit}"
    if not total:
        return f"{desc}: {where} | {rate} {unit}/s"
    fraction = steps / total
    if share is None or _plan is None:
        return f"{desc}: {where} | {rate} {unit}/s | ETA {clock(pace.eta(fraction))} (this pass)"
    before, size = share
    done = before + size * fraction
    return f"{desc}: {where} | {rate} {unit}/s | command {done:.0%} | ETA {clock(_plan.pace.eta(done))}"


def _rate(per_second: float) -> str:
    """A rate with three significant digits, never in exponent notation (``2,150``, ``45.3``)."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def say(text: str) -> None:
    """Print a progress line to standard error (above a tqdm bar if one is shown)."""
    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()
