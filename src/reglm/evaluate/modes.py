"""The evaluation modes: plain evaluation and the evaluation-time methods (the neural cache,
dynamic evaluation, context windows), each one :class:`EvalMode` in :data:`MODES`. ``reglm eval``,
``reglm reproduce``, the preset rows and :meth:`reglm.api.TrainedModel.evaluate` all run them
from here."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reglm.errors import ReglmError

if TYPE_CHECKING:
    import torch

    from reglm.data.batchings import EvalBatchSizes
    from reglm.evaluate.cache import CacheGrid, CacheSpec
    from reglm.evaluate.dynamic_spec import DynamicGrid, DynamicSpec
    from reglm.evaluate.perplexity import EvalResult, Reading
    from reglm.models import LanguageModel


@dataclass
class EvalContext:
    """What every evaluation mode needs: the model on its device, the split and its batching."""

    model: LanguageModel
    ids: torch.Tensor
    """(N,) the split to score"""
    split: str
    batch_size: int
    bptt: int
    reading: Reading
    """how the split is read when the mode reads it plainly (the run's way, or --block)"""
    word_ends: torch.Tensor | None
    """(N,) the tokens that close a word (sub-word models: perplexity is word-level)"""
    device: torch.device
    keep_token_nll: bool
    progress: bool
    valid_ids: torch.Tensor
    """(N_valid,) the validation split, for modes that tune on it"""
    train_ids: torch.Tensor | None
    """(N_train,) the training split, for dynamic evaluation's gradient statistics"""
    memo: dict[str, Any] = field(default_factory=dict)
    """what a mode computes once for several splits (dynamic evaluation's gradient statistics)"""


@dataclass
class EvalOutcome:
    result: EvalResult
    """the result on the split (with per-token NLL when the context asked for it)"""
    summary: str = ""
    """text appended to the split's line"""
    label: str = "model"
    """what the split's scores are of, in the words-only line of the synthetic corpus"""
    report: dict[str, Any] = field(default_factory=dict)
    """mode-specific entries of the JSON output"""
    lines: list[str] = field(default_factory=list)
    """text printed before the split's line"""
    baseline: EvalResult | None = None
    """the model alone on the same targets, for --cache-deltas"""
    setting: str = ""
    """the setting scored (a search's choice), in a reproduction's table"""
    tuned_ppl: float | None = None
    """a search's validation perplexity at the setting it chose"""


def _eval_plain(ctx: EvalContext, _setting: None) -> EvalOutcome:
    from reglm.evaluate.perplexity import evaluate

    result = evaluate(
        ctx.model,
        ctx.ids,
        device=ctx.device,
        keep_token_nll=ctx.keep_token_nll,
        progress=ctx.progress,
        desc=ctx.split,
        word_ends=ctx.word_ends,
        reading=ctx.reading,
    )
    return EvalOutcome(result, report={"reading": ctx.reading.report()})


def _eval_context_window(ctx: EvalContext, context: int) -> EvalOutcome:
    from reglm.evaluate.perplexity import ReadingKind

    if ctx.reading.kind is not ReadingKind.BLOCKS:
        raise ReglmError(
            "--context-window reads blocks; give --block L (or evaluate a run trained with train.batching=blocks)"
        )
    if context >= ctx.reading.block:
        raise ReglmError(
            f"--context-window {context} must be smaller than the block ({ctx.reading.block} tokens, --block); "
            "lower it or raise --block"
        )
    ctx.reading = dataclasses.replace(ctx.reading, context=context)
    outcome = _eval_plain(ctx, None)
    outcome.summary = f" | blocks of {ctx.reading.block}, {context} tokens of context"
    return outcome


def parse_context(text: str, option: str) -> int:
    """``--context-window C``: a whole number of context tokens >= 0."""
    try:
        context = int(text)
    except ValueError:
        raise ReglmError(f"{option} takes a number of tokens (e.g. {option} 480), got {text!r}") from None
    if context < 0:
        raise ReglmError(f"{option} {context} must be >= 0")
    return context


def _eval_cache(ctx: EvalContext, spec: CacheSpec) -> EvalOutcome:
    from reglm.evaluate.cache import cache_evaluate

    result = cache_evaluate(
        ctx.model,
        ctx.ids,
        spec,
        ctx.batch_size,
        ctx.bptt,
        ctx.device,
        keep_token_nll=ctx.keep_token_nll,
        progress=ctx.progress,
        desc=ctx.split,
    )
    return EvalOutcome(
        result,
        summary=f" | cache {spec} | model alone ppl {result.plain.ppl:.2f}",
        label="model+cache",
        baseline=result.plain,
        setting=str(spec),
    )


def _eval_cache_search(ctx: EvalContext, grid: CacheGrid) -> EvalOutcome:
    from reglm.evaluate.cache import cache_search

    search = cache_search(
        ctx.model,
        ctx.valid_ids,
        grid,
        ctx.batch_size,
        ctx.bptt,
        ctx.device,
        progress=ctx.progress,
        desc="cache search (valid)",
    )
    outcome = _eval_cache(ctx, search.best)
    outcome.tuned_ppl = search.ppl
    outcome.report["search"] = {"split": "valid", "grid": grid.as_dict(), **search.as_dict()}
    outcome.lines.append(
        f"cache search on valid ({len(grid)} settings): best {search.best} | loss {search.loss:.4f} | "
        f"ppl {search.ppl:.2f} | model alone ppl {search.model_ppl:.2f}"
    )
    return outcome


def _dynamic_stats(ctx: EvalContext, spec: DynamicSpec, option: str) -> dict[str, torch.Tensor] | None:
    from reglm.evaluate.dynamic import gradient_statistics
    from reglm.evaluate.dynamic_spec import check_training_data

    if spec.variant == "sgd":
        return None
    key = f"stats {spec!r}"
    if key not in ctx.memo:
        check_training_data(ctx.train_ids, spec, option=option)
        ctx.memo[key] = gradient_statistics(ctx.model, ctx.train_ids, spec, device=ctx.device, progress=ctx.progress)
    return ctx.memo[key]


def _run_dynamic(ctx: EvalContext, spec: DynamicSpec, stats: dict[str, torch.Tensor] | None) -> EvalOutcome:
    from reglm.evaluate.dynamic import dynamic_evaluate

    result = dynamic_evaluate(
        ctx.model,
        ctx.ids,
        spec,
        stats,
        ctx.device,
        keep_token_nll=ctx.keep_token_nll,
        progress=ctx.progress,
        desc=f"{ctx.split} (dynamic)",
    )
    summary = f" | dynamic {spec.variant} lr={spec.lr:g} lambda={spec.lam:g} segment={spec.segment}"
    if spec.adapt != "all":
        summary += f" adapt={spec.adapt}"
    setting = f"{spec.variant} lr={spec.lr:g} lambda={spec.lam:g}"
    report = {"dynamic": spec.as_dict()}
    return EvalOutcome(result, summary=summary, label="model+dynamic", report=report, setting=setting)


def _stats_tokens(ctx: EvalContext, spec: DynamicSpec) -> list[float]:
    """The training tokens the gradient statistics read (none for ``variant=sgd``)."""
    if spec.variant == "sgd" or ctx.train_ids is None:
        return []
    return [min(ctx.train_ids.numel(), spec.max_train_tokens or ctx.train_ids.numel())]


def _eval_dynamic(ctx: EvalContext, spec: DynamicSpec) -> EvalOutcome:
    spec = dataclasses.replace(spec, batch_size=ctx.batch_size)
    return _run_dynamic(ctx, spec, _dynamic_stats(ctx, spec, "--dynamic"))


def _eval_dynamic_search(ctx: EvalContext, grid: DynamicGrid) -> EvalOutcome:
    from reglm.evaluate.dynamic import dynamic_search

    grid = dataclasses.replace(grid, spec=dataclasses.replace(grid.spec, batch_size=ctx.batch_size))
    stats = _dynamic_stats(ctx, grid.spec, "--dynamic-search")
    search = dynamic_search(ctx.model, ctx.valid_ids, grid, stats, ctx.device, progress=ctx.progress)
    outcome = _run_dynamic(ctx, search.best, stats)
    outcome.tuned_ppl = search.best_result.ppl
    outcome.report["search"] = {"split": "valid", "grid": grid.as_dict(), **search.as_dict()}
    outcome.lines.append(
        f"dynamic search on valid ({len(grid)} settings): best lr={search.best.lr:g} lambda={search.best.lam:g} | "
        f"loss {search.best_result.loss:.4f} | ppl {search.best_result.ppl:.2f}"
    )
    return outcome


def _parse(module: str, name: str) -> Callable[[str, str], Any]:
    """``module.name`` (a spec parser), imported on use so that ``reglm --help`` stays light."""

    def parse(text: str, option: str) -> Any:
        return getattr(importlib.import_module(module), name)(text, option)

    return parse


@dataclass(frozen=True)
class EvalMode:
    """An evaluation-time method: its flag, how its spec is parsed (before anything is loaded),
    how it runs, and its default streams per batch (a number, a function of the parsed spec, or
    None for the run's eval/test batch size)."""

    name: str
    metavar: str
    help: str
    parse: Callable[[str, str], Any]
    run: Callable[[EvalContext, Any], EvalOutcome]
    batch_size: int | Callable[[Any], int] | None = None
    searches: bool = False
    """tunes on valid, so the scored split defaults to test"""
    passes: Callable[[EvalContext, Any], list[float]] = lambda ctx, setting: [ctx.ids.numel()]
    """the tokens each pass of the mode reads, in order (the command's progress and ETA)"""
    blocks: bool = False
    """reads stateless blocks (``--block``); the others read streams with the state carried"""
    subwords: bool = False
    """scores sub-word (BPE) models; the others score words one token at a time"""
    needs_blocks: bool = False
    """reads blocks only (a run trained on streams is read in blocks of
    :data:`~reglm.data.batchings.EVAL_BLOCK` tokens)"""
    baseline: bool = False
    """its outcome carries the model alone on the same targets (``--cache-deltas``)"""

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return f"mode_{self.name.replace('-', '_')}"


PLAIN = EvalMode("plain", "", "", lambda text, option: None, _eval_plain, blocks=True, subwords=True)
"""The model alone, read as the run reads its splits (or in blocks)."""


FLAG_MODES: list[EvalMode] = [
    EvalMode(
        "context-window",
        "C",
        "score stateless blocks of complete sentences of up to --block tokens (default: the run's "
        "train.batching.block_size) whose first C "
        "tokens only give context, every token scored once (Baevski & Auli Table 5; C=0 is plain block evaluation)",
        parse_context,
        _eval_context_window,
        blocks=True,
        needs_blocks=True,
        subwords=True,
    ),
    EvalMode(
        "cache",
        "SPEC",
        "mix in the continuous cache pointer (Grave et al. 2017): window=W,theta=T,lambda=L, any order; missing "
        "keys take the "
        "AWD-LSTM PTB values window=2000,theta=1.0,lambda=0.1 (WikiText-2: window=3785,theta=0.662,lambda=0.1279)",
        _parse("reglm.evaluate.cache", "parse_cache_spec"),
        _eval_cache,
        1,
        baseline=True,
    ),
    EvalMode(
        "cache-search",
        "GRID",
        "tune the cache on valid and score the chosen values on --split (default test); GRID like "
        "window=500,2000;theta=0.1,0.3;"
        "lambda=0.05,0.1 (missing keys: "
        "window=100,500,1000,2000,3785;theta=0.1,0.3,0.662,1.0;lambda=0.05,0.1,0.1279,0.2,0.3)",
        _parse("reglm.evaluate.cache", "parse_cache_grid"),
        _eval_cache_search,
        1,
        searches=True,
        passes=lambda ctx, grid: [ctx.valid_ids.numel(), ctx.ids.numel()],
        baseline=True,
    ),
    EvalMode(
        "dynamic",
        "SPEC",
        "dynamic evaluation (Krause et al. 2018): "
        "lr=,lambda=,eps=,segment=,variant=rms|sgd,max_train_tokens=N|all,batch_size=,"
        "stats_batch_size=,adapt=all|output, any order; missing keys take the reference's "
        "lr=5e-5,lambda=0.002,eps=2e-5,segment=5,variant=rms,batch_size=1,stats_batch_size=100,adapt=all "
        "(variant=sgd needs lr)",
        _parse("reglm.evaluate.dynamic_spec", "parse_dynamic_spec"),
        _eval_dynamic,
        lambda spec: spec.batch_size,
        passes=lambda ctx, spec: [*_stats_tokens(ctx, spec), ctx.ids.numel()],
    ),
    EvalMode(
        "dynamic-search",
        "GRID",
        "tune dynamic evaluation's lr and lambda on valid and score the best on --split (default test); GRID like "
        "lr=3e-5,5e-5;lambda=0.001,0.002;segment=5 (missing lr/lambda: the reference's 24-point grid around the "
        "settings)",
        _parse("reglm.evaluate.dynamic_spec", "parse_dynamic_grid"),
        _eval_dynamic_search,
        lambda grid: grid.spec.batch_size,
        searches=True,
        passes=lambda ctx, grid: [
            *_stats_tokens(ctx, grid.spec),
            *[ctx.valid_ids.numel()] * len(grid),
            ctx.ids.numel(),
        ],
    ),
]
"""The modes besides plain evaluation, each a ``reglm eval`` flag (at most one per command); a new
evaluation-time method is one entry here (and its module under ``reglm.evaluate``)."""

MODES: dict[str, EvalMode] = {mode.name: mode for mode in (PLAIN, *FLAG_MODES)}
"""Every evaluation mode by name: what ``reglm eval``, ``reproduce``, the preset rows and
:meth:`reglm.api.TrainedModel.evaluate` accept."""


def mode_named(name: str) -> EvalMode:
    """The registered mode ``name``, or :class:`ReglmError` listing them."""
    if name not in MODES:
        raise ReglmError(f"unknown evaluation mode {name!r}; choose one of {', '.join(MODES)}")
    return MODES[name]


def batch_size_for(mode: EvalMode, setting: Any, batching: EvalBatchSizes, split: str, given: int | None = None) -> int:
    """Streams (or blocks) per batch: ``given``, else the mode's own for ``setting``, else the
    run's eval (``split="valid"``) or test batch size (of its ``train.batching``)."""
    own = mode.batch_size(setting) if callable(mode.batch_size) else mode.batch_size
    return given or own or batching.batch_size_for(split)


def reading_for(
    mode: EvalMode, run_reading: Reading, run_block: int, eos_id: int, batch_size: int, block: int | None = None
) -> Reading:
    """How ``mode`` reads a split plainly: as the run reads it (``run_reading``, its batching's
    reading of the split, given by the caller: :func:`~reglm.data.batchings.eval_reading`), with
    ``batch_size`` streams (or blocks); in blocks of ``block`` tokens when given, or of ``run_block``
    (:func:`~reglm.data.batchings.eval_block`) when the mode reads blocks only and the run reads
    streams."""
    from reglm.evaluate.perplexity import Reading, ReadingKind

    reading = dataclasses.replace(run_reading, batch_size=batch_size)
    if block is not None or (mode.needs_blocks and reading.kind is not ReadingKind.BLOCKS):
        reading = Reading.blocks(batch_size, block or run_block, 0, eos_id, reading.bptt)
    return reading


def refuse_subwords(mode: EvalMode, model: object) -> None:
    """:class:`ReglmError` when ``model`` (a sub-word model, named in the message) is given to a
    mode that scores words one token at a time."""
    if not mode.subwords:
        raise ReglmError(
            f"{mode.flag} scores words one token at a time; {model} is a sub-word (BPE) model: "
            "evaluate it plainly or with --context-window"
        )
