"""The step engine: one optimizer step on one batch, and nothing else.

Per step: the learning rate it is given, ``zero_grad``; for each chunk (gradient accumulation:
the streams of one window cut by ``train.small_batch_size``, the MoS recipes'; or the
``train.update_freq`` windows of sentences or blocks the batcher hands over, fairseq's update
frequency), forward from the chunk's slice of the carried state, the objective's per-token loss
(its mean over the scored targets, padding masked) and the output layer's penalty, the objective
terms (AR/TAR, the augmented loss...), the loss scaled by the chunk's share of the scored targets
and, with ``train.sequence_loss``, by the window length, backward; then global-norm clipping and
the optimizer step. It returns the new carried state (the chunks' joined).

It knows nothing of NT-ASGD, BPTT lengths, stages or checkpoints: the trainer
(:mod:`reglm.train.run`) gives it windows and rates. The loss sum and a finiteness flag stay on
the device; :meth:`StepEngine.flush` reads them (one host sync), which the trainer does at log
intervals and before every checkpoint, so the hot loop never waits for the device otherwise.

Its constructor says all it runs with: the model, the objective and its terms, the optimizer
(fine-tuning restarts it through :meth:`StepEngine.replace_optimizer`), the data-parallel strategy
(:mod:`reglm.train.distributed`; one process by default), ``autocast`` (a context factory for
mixed precision, a no-op by default) and whether the forward pass runs through ``torch.compile``.
The strategy makes the chunk pass data-parallel at the first step, once the weights are final
(resumed, or a base model's): DDP then runs each chunk, skips the gradient all-reduce of every
accumulation chunk but the last, and takes a chunk's share of the mean tokens per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from reglm.data.windows import Window
from reglm.encoders.base import State, concat_states, detach_state, select_streams
from reglm.objectives.base import Term, TermInputs


@dataclass
class Chunk:
    """One forward/backward pass of a step: ``streams`` of a batch of ``batch_size`` rows."""

    inputs: Tensor
    targets: Tensor
    scored: Tensor | None
    tokens: int
    streams: slice
    batch_size: int

    @staticmethod
    def of(window: Window, streams: slice) -> Chunk:
        scored = None if window.scored is None else window.scored[streams]
        inputs = window.inputs[streams]
        tokens = inputs.numel() if scored is None else int(scored.sum())
        return Chunk(inputs, window.targets[streams], scored, tokens, streams, window.inputs.size(0))

    @staticmethod
    def whole(window: Window) -> Chunk:
        rows = window.inputs.size(0)
        return Chunk(window.inputs, window.targets, window.scored, window.tokens, slice(0, rows), rows)


@dataclass(frozen=True)
class ChunkPasses:
    """How the chunks of a step run under a data-parallel strategy: ``run`` a chunk's pass,
    ``no_sync`` around every chunk but the last (no gradient all-reduce), and ``token_total``,
    what a step's scored targets count as when a chunk's share is taken of them."""

    run: Callable[..., tuple[Tensor, Tensor, State | None]]
    no_sync: Callable[[], AbstractContextManager]
    token_total: Callable[[int], float]

    @staticmethod
    def local(chunk_pass: Callable[..., tuple[Tensor, Tensor, State | None]]) -> ChunkPasses:
        """One process: the pass as it is, nothing to skip, its own token count."""
        return ChunkPasses(chunk_pass, nullcontext, _same)


class Parallel(Protocol):
    """A data-parallel strategy (:mod:`reglm.train.distributed`)."""

    def chunk_passes(self, model: torch.nn.Module, chunk_pass: Callable[..., Any]) -> ChunkPasses: ...


class StepEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        objective: object,
        terms: Sequence[Term],
        optimizer: torch.optim.Optimizer,
        chunk_size: int | None,
        clip: float,
        sequence_loss: bool,
        parallel: Parallel | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.objective = objective
        self.terms = list(terms)
        self.keep_logits = any("logits" in term.reads for term in self.terms)
        self.optimizer = optimizer
        self.chunk_size = chunk_size
        self.clip = clip
        self.sequence_loss = sequence_loss
        self.parallel = parallel
        self.autocast = autocast
        self.forward: Callable[..., Any] = torch.compile(model) if compile else model
        """what runs the forward pass: the model, or its ``torch.compile`` wrapper"""
        self._passes: ChunkPasses | None = None
        """how the chunks run under :attr:`parallel` (one process when None), made at the first step"""
        self._nll_sum: Tensor | None = None
        self._finite: Tensor | None = None
        self._tokens = 0

    def step(
        self,
        batch: Window | Sequence[Window],
        state: State | None,
        lr: float,
        adversarial: bool = False,
        input_noise: float = 0.0,
    ) -> State | None:
        """One optimizer step on ``batch`` from the carried ``state``; returns the new state.

        ``batch`` is one window, cut into chunks of streams (``train.small_batch_size``), or a
        sequence of windows read from scratch (``train.update_freq`` batches of sentences or
        blocks), each its own chunk. A chunk's mean loss over its scored targets (``scored``
        masks padding) is weighted by its share of the batch's scored targets."""
        model = self.model
        if self._passes is None:
            if self.parallel is None:
                self._passes = ChunkPasses.local(self.chunk_pass)
            else:
                self._passes = self.parallel.chunk_passes(model, self.chunk_pass)
        passes = self._passes
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        chunks = self._chunks(batch, state)
        total = passes.token_total(sum(window.tokens for window, _ in chunks))
        chunk_states = []
        for i, (window, chunk_state) in enumerate(chunks):
            sync = nullcontext() if i == len(chunks) - 1 else passes.no_sync()
            with sync:
                raw_loss, loss, new_state = passes.run(window, chunk_state, adversarial, input_noise)
                (loss * (window.tokens / total)).backward()
            chunk_states.append(detach_state(new_state))
            self._accumulate(raw_loss.detach(), loss.detach(), window.tokens)
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip)
        self.optimizer.step()
        return concat_states(chunk_states) if isinstance(batch, Window) else None

    def replace_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Step with ``optimizer`` from now on (fine-tuning restarts the optimizer)."""
        self.optimizer = optimizer

    def chunk_pass(
        self, window: Chunk, state: State | None, adversarial: bool, input_noise: float
    ) -> tuple[Tensor, Tensor, State | None]:
        """The forward pass of one chunk from ``state``: ``(its mean NLL over the scored targets,
        the loss it backpropagates, its new state)``."""
        model, x, y = self.model, window.inputs, window.targets
        with self.autocast():
            out = self.forward(x, state, input_noise=input_noise)
            scored = self.objective.chunk_loss(
                model, out, x, y, window.streams, window.batch_size, adversarial, self.keep_logits
            )
            raw_loss = (
                scored.nll.mean()
                if window.scored is None
                else scored.nll.masked_fill(~window.scored, 0).sum() / window.tokens
            )
            loss = raw_loss + scored.penalty
            inputs = TermInputs(out, y, scored.logits, model)
            for term in self.terms:
                loss = loss + term(inputs)
            if self.sequence_loss:
                loss = loss * x.size(1)
        return raw_loss, loss, out.state

    def _chunks(self, batch: Window | Sequence[Window], state: State | None) -> list[tuple[Chunk, State | None]]:
        """The passes of a step: the configured stream chunks of one window, or each window whole."""
        if not isinstance(batch, Window):
            return [(Chunk.whole(window), None) for window in batch]
        return [
            (Chunk.of(batch, streams), select_streams(state, streams))
            for streams in self.chunks_of(batch.inputs.size(0))
        ]

    def chunks_of(self, rows: int) -> list[slice]:
        """The stream slices a window of ``rows`` streams is cut into (all of it when no chunk size is set)."""
        chunk = self.chunk_size or rows
        return [slice(start, start + chunk) for start in range(0, rows, chunk)]

    def _accumulate(self, raw_loss: Tensor, loss: Tensor, tokens: int) -> None:
        nll = raw_loss.double() * tokens
        finite = torch.isfinite(loss)
        if self._nll_sum is None or self._finite is None:
            self._nll_sum, self._finite = nll, finite
        else:
            self._nll_sum = self._nll_sum + nll
            self._finite = self._finite & finite
        self._tokens += tokens

    def flush(self) -> tuple[float, int, bool]:
        """``(summed NLL, tokens, every loss finite)`` since the last flush (one host sync)."""
        if self._nll_sum is None or self._finite is None:
            return 0.0, 0, True
        nll, finite, tokens = float(self._nll_sum), bool(self._finite), self._tokens
        self._nll_sum, self._finite, self._tokens = None, None, 0
        return nll, tokens, finite


def _same(tokens: int) -> int:
    return tokens
