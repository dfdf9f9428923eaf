"""Deterministic evaluation: one full pass, summed token NLL over the word count.

The split is read through the window planner (:class:`~reglm.data.windows.StreamPlan`, cover
``"all"``): ``batch_size`` contiguous streams, windows of ``bptt`` tokens, the encoder's state
carried from window to window, every target of the split scored exactly once whatever the batch
size. Perplexity is ``exp(sum NLL / words)`` (``words`` = targets for a word-level model);
nothing is sampled or averaged per batch.

:func:`stream_pass` is the one stateful pass every scoring of a split goes through (plain
evaluation, the trainer's objectives, the API, the studies): several models read the same
windows, each carrying its own state.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from reglm.data.sentence_plan import SentencePlan
from reglm.data.windows import ContextPlan, StreamPlan, Window
from reglm.encoders.base import EncoderOutput, State, detach_state
from reglm.progress import track


def perplexity(loss: float) -> float:
    """``exp(loss)`` of a mean NLL in nats, or ``inf`` where that overflows (a NaN loss gives
    NaN): never raises."""
    return math.exp(loss) if loss < 709.0 else (math.inf if loss == loss else math.nan)


NATS_PER_UNIT = {"e": 1.0, "10": math.log(10.0)}
"""Nats in one unit of each log base a score is written in (``reglm score --base``)."""


def perplexity_of(nll: float, tokens: int, base: str = "e") -> float:
    """The perplexity of ``tokens`` scored targets whose negative log-probabilities sum to ``nll``
    in ``base`` units (:data:`NATS_PER_UNIT`): ``exp(nll / tokens)`` in nats, ``nan`` for no
    tokens, ``inf`` where it overflows. Every sum of scores becomes a perplexity here."""
    if tokens == 0:
        return math.nan
    return perplexity(nll * NATS_PER_UNIT[base] / tokens)


@dataclass
class EvalResult:
    loss: float
    """mean NLL per scored target (nats)"""
    tokens: int
    """number of scored targets"""
    token_nll: Tensor | None = None
    """(tokens,) NLL of every scored target in stream order, when asked for"""
    positions: Tensor | None = None
    """(tokens,) index of each of those targets in the 1-D stream"""
    words: int | None = None
    """words the scored targets close (None: every target is a word)"""

    @property
    def word_loss(self) -> float:
        """Summed NLL per word: the loss behind :attr:`ppl`."""
        return self.loss * self.tokens / max(self.words if self.words is not None else self.tokens, 1)

    @property
    def ppl(self) -> float:
        """Word-level perplexity ``exp(sum NLL / words)``."""
        return perplexity(self.word_loss)

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens}
        if self.words is not None and self.words != self.tokens:
            out["words"] = self.words
        return out


@dataclass
class PassTotals:
    """What :func:`stream_pass` adds up: per name, the mean over scored targets (a float64 tensor
    of the values' leading shape), the token and word counts, and the kept per-target values."""

    means: dict[str, Tensor]
    tokens: int
    words: int
    kept: dict[str, tuple[Tensor, Tensor]]
    """name -> ``(positions, values)`` of every scored target in stream order, both ``(tokens,)``"""

    def mean(self, name: str) -> float:
        return float(self.means[name])


def stream_pass(
    models: Sequence[torch.nn.Module],
    plan: StreamPlan | ContextPlan | SentencePlan,
    bptt: int,
    per_window: Callable[[list[EncoderOutput], Window], dict[str, Tensor]],
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "eval",
    keep: Sequence[str] = (),
) -> PassTotals:
    """Run ``models`` (in eval mode, without gradients; modes restored after) over ``plan``'s
    windows (of ``bptt`` columns for a stream plan), each model carrying its own state from window
    to window when the plan's windows continue each other (a stream plan's; the others' are read
    from scratch). ``per_window(outputs, window)`` returns ``(..., B, T)`` values per name; their sums over the
    scored targets are returned as
    means, and, for the names in ``keep`` (``(B, T)`` values), every scored target's value."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    plan.to(device)
    states: list[State] = []
    sums: dict[str, Tensor] = {}
    tokens = words = 0
    pieces: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in keep}
    try:
        with torch.no_grad():
            for window in track(plan.windows(bptt), plan.count(bptt), desc, "batch", progress):
                if not (plan.carries_state and states):
                    states = [m.init_state(window.inputs.size(0), device=device) for m in models]
                outs = [m(window.inputs, s) for m, s in zip(models, states)]
                states = [detach_state(o.state) for o in outs]
                for name, value in per_window(outs, window).items():
                    total = window.masked_sum(value)
                    sums[name] = sums[name] + total if name in sums else total
                    if name in pieces:
                        pieces[name].append(window.scored_values(value))
                tokens += window.tokens
                words += window.words
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    kept = {name: in_stream_order(parts) for name, parts in pieces.items()}
    return PassTotals({name: total / max(tokens, 1) for name, total in sums.items()}, tokens, words, kept)


def in_stream_order(pieces: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Windows' ``(positions, values)`` joined and sorted by stream position."""
    positions = torch.cat([p for p, _ in pieces])
    order = torch.argsort(positions)
    return positions[order], torch.cat([v for _, v in pieces])[order]


class ReadingKind(enum.Enum):
    """The ways a split is read for scoring (:class:`Reading`)."""

    STREAMS = "streams"
    """contiguous streams in windows of ``bptt`` tokens, the state carried (the LSTM papers')"""
    BLOCKS = "blocks"
    """stateless windows of at most ``block`` tokens, the first ``context`` context only"""
    SENTENCES = "sentences"
    """single sentences grouped by length into batches of at most ``max_tokens`` tokens"""


@dataclass(frozen=True)
class Reading:
    """How a split is read for scoring, of an explicit :attr:`kind` (:class:`ReadingKind`): ``batch_size``
    contiguous streams in windows of ``bptt`` tokens with the state carried (the LSTM papers');
    with ``block``, stateless windows of at most ``block`` tokens of which the first ``context``
    are context only, and with ``sentence_end`` (the ``<eos>`` id) scored parts of complete
    sentences (Baevski & Auli's WikiText-103); with ``max_tokens``, single sentences (ending at
    ``sentence_end``) grouped by length into batches of at most that many tokens (their billion
    word). The kind is decided once, here, from the settings a run's config gives (the named
    constructors :meth:`streams`, :meth:`blocks` and :meth:`sentences` state it); a combination
    that is no kind is refused, and every consumer dispatches on :attr:`kind`."""

    batch_size: int
    bptt: int = 35
    block: int | None = None
    context: int = 0
    sentence_end: int | None = None
    max_tokens: int | None = None
    kind: ReadingKind = field(init=False)

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            if self.sentence_end is None or self.block is not None:
                raise ValueError("reading single sentences needs the sentence_end id, and no block")
            kind = ReadingKind.SENTENCES
        else:
            kind = ReadingKind.STREAMS if self.block is None else ReadingKind.BLOCKS
        object.__setattr__(self, "kind", kind)

    @classmethod
    def streams(cls, batch_size: int, bptt: int) -> Reading:
        return cls(batch_size, bptt)

    @classmethod
    def blocks(
        cls, batch_size: int, block: int, context: int = 0, sentence_end: int | None = None, bptt: int = 35
    ) -> Reading:
        return cls(batch_size, bptt, block, context, sentence_end)

    @classmethod
    def sentences(cls, max_tokens: int, sentence_end: int, batch_size: int = 1, bptt: int = 35) -> Reading:
        return cls(batch_size, bptt, sentence_end=sentence_end, max_tokens=max_tokens)

    def plan(self, ids: Tensor, word_ends: Tensor | None = None) -> StreamPlan | ContextPlan | SentencePlan:
        if self.kind is ReadingKind.SENTENCES:
            return SentencePlan(ids, self.sentence_end, self.max_tokens, word_ends)
        if self.kind is ReadingKind.BLOCKS:
            ends = None if self.sentence_end is None else ids == self.sentence_end
            return ContextPlan(ids, self.block, self.context, self.batch_size, word_ends, sentence_ends=ends)
        return StreamPlan(ids, self.batch_size, "all", word_ends)

    def report(self) -> dict[str, Any]:
        """The reading as the JSON output of ``reglm eval`` states it."""
        if self.kind is ReadingKind.SENTENCES:
            return {"kind": self.kind.value, "max_tokens": self.max_tokens}
        if self.kind is ReadingKind.BLOCKS:
            return {
                "kind": self.kind.value,
                "block": self.block,
                "context": self.context,
                "whole_sentences": self.sentence_end is not None,
            }
        return {"kind": self.kind.value, "bptt": self.bptt}


def evaluate(
    model: torch.nn.Module,
    ids: Tensor,
    batch_size: int = 1,
    bptt: int = 35,
    device: torch.device | str = "cpu",
    keep_token_nll: bool = False,
    progress: bool = False,
    desc: str = "eval",
    word_ends: Tensor | None = None,
    reading: Reading | None = None,
) -> EvalResult:
    """Score ``ids`` (N,) with ``model`` in eval mode; returns the exact corpus-level NLL.

    ``batch_size`` streams in windows of ``bptt``, or as ``reading`` says; ``word_ends: (N,)``
    marks the tokens that close a word (sub-word models; default: all).
    """
    reading = reading if reading is not None else Reading.streams(batch_size, bptt)
    plan = reading.plan(ids, word_ends)
    totals = stream_pass(
        [model],
        plan,
        reading.bptt,
        lambda outs, w: {"nll": model.output.nll(outs[0], w.targets)},
        device,
        progress,
        desc,
        ("nll",) if keep_token_nll else (),
    )
    return totals_result(totals, "nll", word_ends is not None)


def totals_result(totals: PassTotals, name: str, word_level: bool = False) -> EvalResult:
    """The :class:`EvalResult` of the NLL ``name`` of a pass (with its per-target values if kept)."""
    result = EvalResult(loss=totals.mean(name), tokens=totals.tokens, words=totals.words if word_level else None)
    if name in totals.kept:
        result.positions, result.token_nll = totals.kept[name]
    return result


def truth_comparison(result: EvalResult, ids: torch.Tensor, true_logp: torch.Tensor, eos_id: int) -> dict[str, float]:
    """Model vs true perplexity over the same scored targets, ``<eos>`` targets excluded."""
    assert result.token_nll is not None and result.positions is not None
    targets = ids[result.positions]
    words = targets != eos_id
    model_nll = result.token_nll[words].double()
    true_nll = -true_logp[result.positions][words].double()
    return {
        "words": int(words.sum()),
        "model_word_ppl": perplexity(float(model_nll.mean())),
        "true_word_ppl": perplexity(float(true_nll.mean())),
        "mean_logq_minus_logp": float((true_nll - model_nll).mean()),
        "std_logq_minus_logp": float((true_nll - model_nll).std()),
    }
