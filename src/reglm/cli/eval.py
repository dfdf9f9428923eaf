"""``reglm eval``: a trained run on a split, alone or with an evaluation-time method (the neural
cache, dynamic evaluation), each an entry of :data:`EVAL_MODES`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reglm.cli.common import add_data_options, check_output_file, load_scored_run, refuse_inputs, write_output
from reglm.errors import ReglmError

if TYPE_CHECKING:
    import torch

    from reglm.evaluate.cache import CacheGrid, CacheSpec
    from reglm.evaluate.dynamic_spec import DynamicGrid, DynamicSpec
    from reglm.evaluate.perplexity import EvalResult, Reading
    from reglm.models import LanguageModel


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on a split, alone or with the neural cache")
    p.add_argument("run", help="run directory (or a model directory)")
    p.add_argument(
        "--split",
        choices=["valid", "test"],
        help="split to score (default: valid; test with --cache-search or --dynamic-search)",
    )
    p.add_argument(
        "--checkpoint",
        choices=["best", "last", "state"],
        default="best",
        help="best/ or last/ of the run, or state: the weights of its latest state.pt (a run interrupted mid-epoch; "
        "the average once averaging runs)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        metavar="N",
        help="score only the first N tokens of the split (a quick estimate; the searches tune on the first N of valid)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="streams (or blocks) per batch (default: the run's eval/test batch size; 1 with the cache)",
    )
    p.add_argument(
        "--block",
        type=int,
        metavar="L",
        help="score in stateless blocks of at most L tokens, scored parts ending at sentence ends (Baevski & Auli; default with --context-window: the run's train.block_size)",
    )
    add_data_options(p, with_vocab=False)
    modes = p.add_mutually_exclusive_group()
    for mode in EVAL_MODES:
        modes.add_argument(mode.flag, nargs="?", const="", metavar=mode.metavar, dest=mode.dest, help=mode.help)
    p.add_argument(
        "--cache-deltas",
        metavar="FILE",
        help="with --cache/--cache-search: write word, count, summed loss change (cache - model) per word type as TSV (AWD-LSTM Table 3)",
    )
    p.add_argument(
        "--word-probs",
        metavar="FILE",
        help="write position, line, index, word, prob, log_prob of every token of the split as TSV: "
        "the first scored after <eos>, then the N-1 targets of the perplexity",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


@dataclass
class _EvalContext:
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


@dataclass
class _EvalOutcome:
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


def _eval_plain(ctx: _EvalContext, _setting: None) -> _EvalOutcome:
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
    return _EvalOutcome(result, report={"reading": _reading_report(ctx.reading)})


def _reading_report(reading: Reading) -> dict[str, Any]:
    if reading.max_tokens is not None:
        return {"kind": "sentences", "max_tokens": reading.max_tokens}
    if reading.block is not None:
        return {
            "kind": "blocks",
            "block": reading.block,
            "context": reading.context,
            "whole_sentences": reading.sentence_end is not None,
        }
    return {"kind": "streams", "bptt": reading.bptt}


def _eval_context_window(ctx: _EvalContext, context: int) -> _EvalOutcome:
    if ctx.reading.block is None:
        raise ReglmError(
            "--context-window reads blocks; give --block L (or evaluate a run trained with train.batching=blocks)"
        )
    if context >= ctx.reading.block:
        raise ReglmError(
            f"--context-window {context} must be smaller than the block ({ctx.reading.block} tokens, --block); lower it or raise --block"
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


def _eval_cache(ctx: _EvalContext, spec: CacheSpec) -> _EvalOutcome:
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
    return _EvalOutcome(
        result,
        summary=f" | cache {spec} | model alone ppl {result.plain.ppl:.2f}",
        label="model+cache",
        baseline=result.plain,
    )


def _eval_cache_search(ctx: _EvalContext, grid: CacheGrid) -> _EvalOutcome:
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
    outcome.report["search"] = {"split": "valid", "grid": grid.as_dict(), **search.as_dict()}
    outcome.lines.append(
        f"cache search on valid ({len(grid)} settings): best {search.best} | loss {search.loss:.4f} | ppl {search.ppl:.2f} | model alone ppl {search.model_ppl:.2f}"
    )
    return outcome


def _dynamic_stats(ctx: _EvalContext, spec: DynamicSpec, option: str) -> dict[str, torch.Tensor] | None:
    from reglm.evaluate.dynamic import gradient_statistics
    from reglm.evaluate.dynamic_spec import check_training_data

    if spec.variant == "sgd":
        return None
    check_training_data(ctx.train_ids, spec, option=option)
    return gradient_statistics(ctx.model, ctx.train_ids, spec, device=ctx.device, progress=ctx.progress)


def _run_dynamic(ctx: _EvalContext, spec: DynamicSpec, stats: dict[str, torch.Tensor] | None) -> _EvalOutcome:
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
    return _EvalOutcome(result, summary=summary, label="model+dynamic", report={"dynamic": spec.as_dict()})


def _stats_tokens(ctx: _EvalContext, spec: DynamicSpec) -> list[float]:
    """The training tokens the gradient statistics read (none for ``variant=sgd``)."""
    if spec.variant == "sgd" or ctx.train_ids is None:
        return []
    return [min(ctx.train_ids.numel(), spec.max_train_tokens or ctx.train_ids.numel())]


def _eval_dynamic(ctx: _EvalContext, spec: DynamicSpec) -> _EvalOutcome:
    spec = dataclasses.replace(spec, batch_size=ctx.batch_size)
    return _run_dynamic(ctx, spec, _dynamic_stats(ctx, spec, "--dynamic"))


def _eval_dynamic_search(ctx: _EvalContext, grid: DynamicGrid) -> _EvalOutcome:
    from reglm.evaluate.dynamic import dynamic_search

    grid = dataclasses.replace(grid, spec=dataclasses.replace(grid.spec, batch_size=ctx.batch_size))
    stats = _dynamic_stats(ctx, grid.spec, "--dynamic-search")
    search = dynamic_search(ctx.model, ctx.valid_ids, grid, stats, ctx.device, progress=ctx.progress)
    outcome = _run_dynamic(ctx, search.best, stats)
    outcome.report["search"] = {"split": "valid", "grid": grid.as_dict(), **search.as_dict()}
    outcome.lines.append(
        f"dynamic search on valid ({len(grid)} settings): best lr={search.best.lr:g} lambda={search.best.lam:g} | loss {search.best_result.loss:.4f} | ppl {search.best_result.ppl:.2f}"
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
    run: Callable[[_EvalContext, Any], _EvalOutcome]
    batch_size: int | Callable[[Any], int] | None = None
    searches: bool = False
    """tunes on valid, so the scored split defaults to test"""
    passes: Callable[[_EvalContext, Any], list[float]] = lambda ctx, setting: [ctx.ids.numel()]
    """the tokens each pass of the mode reads, in order (the command's progress and ETA)"""

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return f"mode_{self.name.replace('-', '_')}"


EVAL_MODES: list[EvalMode] = [
    EvalMode(
        "context-window",
        "C",
        "score stateless blocks of complete sentences of up to --block tokens (default: the run's train.block_size) whose first C "
        "tokens only give context, every token scored once (Baevski & Auli Table 5; C=0 is plain block evaluation)",
        parse_context,
        _eval_context_window,
    ),
    EvalMode(
        "cache",
        "SPEC",
        "mix in the continuous cache pointer (Grave et al. 2017): window=W,theta=T,lambda=L, any order; missing keys take the "
        "AWD-LSTM PTB values window=2000,theta=1.0,lambda=0.1 (WikiText-2: window=3785,theta=0.662,lambda=0.1279)",
        _parse("reglm.evaluate.cache", "parse_cache_spec"),
        _eval_cache,
        1,
    ),
    EvalMode(
        "cache-search",
        "GRID",
        "tune the cache on valid and score the chosen values on --split (default test); GRID like window=500,2000;theta=0.1,0.3;"
        "lambda=0.05,0.1 (missing keys: window=100,500,1000,2000,3785;theta=0.1,0.3,0.662,1.0;lambda=0.05,0.1,0.1279,0.2,0.3)",
        _parse("reglm.evaluate.cache", "parse_cache_grid"),
        _eval_cache_search,
        1,
        searches=True,
        passes=lambda ctx, grid: [ctx.valid_ids.numel(), ctx.ids.numel()],
    ),
    EvalMode(
        "dynamic",
        "SPEC",
        "dynamic evaluation (Krause et al. 2018): lr=,lambda=,eps=,segment=,variant=rms|sgd,max_train_tokens=N|all,batch_size=,"
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
        "lr=3e-5,5e-5;lambda=0.001,0.002;segment=5 (missing lr/lambda: the reference's 24-point grid around the settings)",
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
"""The ``reglm eval`` modes besides plain evaluation, at most one per command; a new
evaluation-time method is one entry here (and its module under ``reglm.evaluate``)."""

PLAIN = EvalMode("plain", "", "", lambda text, option: None, _eval_plain)


def _eval_mode(args: argparse.Namespace) -> tuple[EvalMode, Any]:
    """The evaluation mode given and its parsed setting (validated before anything is loaded)."""
    for mode in EVAL_MODES:
        text = getattr(args, mode.dest)
        if text is not None:
            return mode, mode.parse(text, mode.flag)
    return PLAIN, None


def cmd_eval(args: argparse.Namespace) -> int:
    from reglm.evaluate.perplexity import Reading
    from reglm.evaluate.sentences import sentence_log_probs
    from reglm.evaluate.word_probs import write_loss_deltas, write_word_probs
    from reglm.progress import plan
    from reglm.train.batching import eval_reading
    from reglm.train.results import truth_comparison

    mode, setting = _eval_mode(args)
    if args.cache_deltas is not None and mode.name not in ("cache", "cache-search"):
        raise ReglmError("--cache-deltas compares the cache with the model alone; add --cache SPEC or --cache-search")
    if args.batch_size is not None and args.batch_size < 1:
        raise ReglmError(f"--batch-size {args.batch_size} must be >= 1")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ReglmError(f"--max-tokens {args.max_tokens} must be >= 2 (the first token is context, the rest scored)")
    if args.block is not None and args.block < 1:
        raise ReglmError(f"--block {args.block} must be >= 1")
    if args.block is not None and mode.name not in ("plain", "context-window"):
        raise ReglmError(
            f"--block reads stateless blocks; {mode.flag} reads streams with the state carried: drop one of them"
        )
    check_output_file("--word-probs", args.word_probs)
    check_output_file("--cache-deltas", args.cache_deltas)
    if (
        args.word_probs is not None
        and args.cache_deltas is not None
        and Path(args.word_probs).absolute() == Path(args.cache_deltas).absolute()
    ):
        raise ReglmError("--word-probs and --cache-deltas name the same file; give two paths")
    split = args.split or ("test" if mode.searches else "valid")

    loaded = load_scored_run(args.run, args.checkpoint, args.data, args.data_dir)
    if loaded.subword and mode.name not in ("plain", "context-window"):
        raise ReglmError(
            f"{mode.flag} scores words one token at a time; {loaded.directory} is a sub-word (BPE) model: evaluate it plainly or with --context-window"
        )
    directory, model, config, vocab, corpus, device = (
        loaded.directory,
        loaded.model,
        loaded.config,
        loaded.vocab,
        loaded.corpus,
        loaded.device,
    )
    cached = corpus.cache.path if corpus.cache is not None else None
    inputs = [directory, directory.parent, Path(config.data.name).expanduser(), cached]
    refuse_inputs("--word-probs", args.word_probs, inputs)
    refuse_inputs("--cache-deltas", args.cache_deltas, inputs)
    ids, valid_ids, word_ends = getattr(corpus, split), corpus.valid, corpus.split_word_ends(split)
    if args.max_tokens is not None:
        ids, valid_ids = ids[: args.max_tokens], valid_ids[: args.max_tokens]
        word_ends = None if word_ends is None else word_ends[: args.max_tokens]
    default_batch_size = mode.batch_size(setting) if callable(mode.batch_size) else mode.batch_size
    batch_size = (
        args.batch_size
        or default_batch_size
        or (config.train.eval_batch_size if split == "valid" else config.train.test_batch_size)
    )
    reading = dataclasses.replace(eval_reading(config.train, split, vocab.eos_id), batch_size=batch_size)
    if args.block is not None or (mode.name == "context-window" and reading.block is None):
        reading = Reading(batch_size, config.train.bptt, args.block or config.train.block_size, 0, vocab.eos_id)
    truth = corpus.truth[split] if corpus.truth is not None else None
    keep = truth is not None or args.word_probs is not None or args.cache_deltas is not None
    if args.max_tokens is not None and reading.block is None and ids.numel() - 1 < batch_size:
        raise ReglmError(
            f"the first {ids.numel()} tokens of {split} (--max-tokens) are too few for {batch_size} streams; "
            "lower --batch-size or raise --max-tokens"
        )
    ctx = _EvalContext(
        model,
        ids,
        split,
        batch_size,
        config.train.bptt,
        reading,
        word_ends,
        device,
        keep,
        True,
        valid_ids,
        corpus.train,
    )
    with plan(mode.passes(ctx, setting)):
        outcome = mode.run(ctx, setting)
    result = outcome.result
    if args.word_probs is not None:
        first = float(sentence_log_probs(model, [[int(ids[0])]], vocab.eos_id, device)[0][0])
        write_output(
            "--word-probs", args.word_probs, lambda: write_word_probs(args.word_probs, result, ids, vocab, first)
        )
    if args.cache_deltas is not None:
        write_output(
            "--cache-deltas",
            args.cache_deltas,
            lambda: write_loss_deltas(args.cache_deltas, result, outcome.baseline, ids, vocab),
        )
    out = {
        "run": str(args.run),
        "checkpoint": str(directory),
        "split": split,
        "batch_size": batch_size,
        "mode": mode.name,
        **result.as_dict(),
        **outcome.report,
    }
    out["oov_penalty"] = "none"
    if args.max_tokens is not None:
        out["max_tokens"] = args.max_tokens
    for key, path in (("word_probs", args.word_probs), ("cache_deltas", args.cache_deltas)):
        if path is not None:
            out[key] = path
    if truth is not None:
        out["synthetic"] = truth_comparison(result, ids, truth, vocab.eos_id)
    if args.json:
        print(json.dumps(out))
        return 0
    for line in outcome.lines:
        print(line)
    words = (
        f" | words {result.words} (word-level ppl)"
        if result.words is not None and result.words != result.tokens
        else ""
    )
    part = f" (first {ids.numel()} tokens)" if args.max_tokens is not None else ""
    print(
        f"{split}{part}: loss {result.loss:.4f} | ppl {result.ppl:.2f} | tokens {result.tokens}{words}{outcome.summary}"
    )
    if truth is not None:
        s = out["synthetic"]
        print(f"words only: {outcome.label} ppl {s['model_word_ppl']:.2f} | true ppl {s['true_word_ppl']:.2f}")
    if args.word_probs is not None:
        print(
            f"wrote word probabilities to {args.word_probs} ({result.tokens + 1} rows: the first token scored "
            f"after <eos>, then the {result.tokens} targets of the perplexity above)"
        )
    if args.cache_deltas is not None:
        print(f"wrote cache loss deltas to {args.cache_deltas}")
    return 0
