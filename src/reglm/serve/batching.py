"""Concurrent scoring requests joined into one model call.

Each request puts its sentences on a queue and awaits its own result. One worker takes the
first waiting request, then every request that arrives within ``max_wait`` seconds or is already
queued, up to ``max_tokens`` words per call (a request larger than that is scored alone), and
scores them all with one call of the scoring function -- :meth:`reglm.api.TrainedModel.
full_scores_batch`, which sorts the sentences by length and pads them into batches -- on a
single model thread, so the event loop keeps accepting requests meanwhile. While a call runs,
the next requests queue up: under load the batches grow by themselves, and the wait only costs
latency when the server is idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

ScoreFn = Callable[[list[str]], Sequence[Any]]
"""Scores of a list of sentences, one item per sentence, in order."""


@dataclass
class _Request:
    sentences: list[str]
    tokens: int
    result: asyncio.Future = field(repr=False)


class Batcher:
    """Scores the sentences of concurrent requests in shared calls of ``score`` run on ``executor``."""

    def __init__(self, score: ScoreFn, executor: Executor, max_wait: float, max_tokens: int) -> None:
        if max_wait < 0 or max_tokens < 1:
            raise ValueError(f"need max_wait >= 0 and max_tokens >= 1, got {max_wait}, {max_tokens}")
        self.score = score
        self.executor = executor
        self.max_wait = max_wait
        self.max_tokens = max_tokens
        self.requests = 0
        """requests scored so far"""
        self.calls = 0
        """calls of ``score`` so far (fewer than requests when requests shared calls)"""
        self.waiting = 0
        """requests submitted and not answered yet"""
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Score what is queued, then stop the worker."""
        if self._worker is not None:
            await self._queue.put(None)
            await self._worker
            self._worker = None

    async def submit(self, sentences: list[str]) -> list[Any]:
        """The scores of ``sentences``, computed with whatever other requests are waiting."""
        if self._worker is None:
            raise RuntimeError("the batcher is not running")
        request = _Request(
            sentences, sum(len(s.split()) + 1 for s in sentences), asyncio.get_running_loop().create_future()
        )
        self.waiting += 1
        try:
            await self._queue.put(request)
            return await request.result
        finally:
            self.waiting -= 1

    async def _next(self, deadline: float) -> _Request | None | bool:
        """The next queued item, waiting until ``deadline`` at most (False when none came)."""
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            try:
                return await asyncio.wait_for(self._queue.get(), remaining)
            except asyncio.TimeoutError:
                return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        held: _Request | None | bool = False
        while True:
            first = held if held is not False else await self._queue.get()
            held = False
            if first is None:
                return
            batch, tokens = [first], first.tokens
            deadline = loop.time() + self.max_wait
            while tokens < self.max_tokens:
                item = await self._next(deadline)
                if item is False:
                    break
                if item is None or tokens + item.tokens > self.max_tokens:
                    held = item
                    break
                batch.append(item)
                tokens += item.tokens
            await self._score(batch)

    async def _score(self, batch: list[_Request]) -> None:
        sentences = [s for request in batch for s in request.sentences]
        self.calls += 1
        self.requests += len(batch)
        try:
            scores = await asyncio.get_running_loop().run_in_executor(self.executor, self.score, sentences)
        except Exception as exc:  # every waiting request gets the error; the worker goes on
            for request in batch:
                if not request.result.done():
                    request.result.set_exception(exc)
            return
        start = 0
        for request in batch:
            end = start + len(request.sentences)
            if not request.result.done():
                request.result.set_result(list(scores[start:end]))
            start = end
