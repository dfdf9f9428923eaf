"""The ``reglm`` command line.

Subcommands: ``train``, ``train-discriminator``, ``finetune``, ``eval``, ``generate``, ``analyze``,
``study``, ``data download|info``, ``presets``, ``config``.
Model and training options are not flags of their own: any field of the run configuration is
set with ``section.field=value`` (``reglm config`` lists them), applied after ``--preset``.
User mistakes print one line ``reglm: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reglm.errors import ReglmError, TrainingDiverged, TrainingInterrupted
from reglm.study_cli import add_study_parser, cmd_study

if TYPE_CHECKING:
    import torch

    from reglm.evaluate.cache import CacheGrid, CacheSpec
    from reglm.evaluate.dynamic import DynamicGrid, DynamicSpec
    from reglm.evaluate.perplexity import EvalResult
    from reglm.models import LanguageModel

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def _add_data_options(p: argparse.ArgumentParser, with_vocab: bool = True) -> None:
    p.add_argument("--data", help="ptb, wikitext-2, wikitext-103, synthetic, or a directory with train.txt/valid.txt/test.txt")
    p.add_argument("--data-dir", help="download cache for built-in corpora (default: $REGLM_DATA_DIR or ~/.cache/reglm)")
    if with_vocab:
        p.add_argument("--min-freq", type=int, help="map training words seen fewer times to <unk>")
        p.add_argument("--max-vocab", type=int, help="keep only this many most frequent words")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reglm", description="Regularized word-level neural language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (default: a small LSTM on the synthetic trigram corpus)")
    p.add_argument("--preset", help="a bundled preset (see `reglm presets`) or a YAML file")
    _add_data_options(p)
    p.add_argument("--out", help="run directory (default: runs/<preset>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.lr=10 model.emb_size=400")

    p = sub.add_parser("eval", help="evaluate a trained run on a split, alone or with the neural cache")
    p.add_argument("run", help="run directory (or a model directory)")
    p.add_argument("--split", choices=["valid", "test"], help="split to score (default: valid; test with --cache-search or --dynamic-search)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--batch-size", type=int, help="streams per batch (default: the run's eval/test batch size; 1 with the cache)")
    _add_data_options(p, with_vocab=False)
    modes = p.add_mutually_exclusive_group()  # evaluation modes (EVAL_MODES), at most one per command
    modes.add_argument(
        "--cache", nargs="?", const="", metavar="SPEC",
        help="mix in the continuous cache pointer (Grave et al. 2017): window=W,theta=T,lambda=L, any order; "
        "missing keys take the AWD-LSTM PTB values window=2000,theta=1.0,lambda=0.1 (WikiText-2: window=3785,theta=0.662,lambda=0.1279)",
    )
    modes.add_argument(
        "--cache-search", nargs="?", const="", metavar="GRID",
        help="tune the cache on valid and score the chosen values on --split (default test); GRID like "
        "window=500,2000;theta=0.1,0.3;lambda=0.05,0.1 (missing keys: window=100,500,1000,2000,3785;theta=0.1,0.3,0.662,1.0;lambda=0.05,0.1,0.1279,0.2,0.3)",
    )
    modes.add_argument(
        "--dynamic", nargs="?", const="", metavar="SPEC",
        help="dynamic evaluation (Krause et al. 2018): lr=,lambda=,eps=,segment=,variant=rms|sgd,max_train_tokens=N|all,batch_size=,stats_batch_size=, any order; "
        "missing keys take the reference's lr=5e-5,lambda=0.002,eps=2e-5,segment=5,variant=rms,batch_size=1,stats_batch_size=100 (variant=sgd needs lr)",
    )
    modes.add_argument(
        "--dynamic-search", nargs="?", const="", metavar="GRID",
        help="tune dynamic evaluation's lr and lambda on valid and score the best on --split (default test); GRID like "
        "lr=3e-5,5e-5;lambda=0.001,0.002;segment=5 (missing lr/lambda: the reference's 24-point grid around the settings)",
    )
    p.add_argument("--cache-deltas", metavar="FILE", help="with --cache/--cache-search: write word, count, summed loss change (cache - model) per word type as TSV (AWD-LSTM Table 3)")
    p.add_argument("--word-probs", metavar="FILE", help="write position, word, prob, log_prob of every scored token as TSV")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("generate", help="sample text from a trained run, printed word by word as it is sampled")
    p.add_argument("run")
    p.add_argument("--words", type=int, default=50, help="how many tokens to sample (no upper bound: the output streams)")
    p.add_argument("--temperature", type=float, default=1.0, help="> 0; tiny values sample the most likely word (greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="", help="words to condition on (each must be in the vocabulary)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")

    p = sub.add_parser("analyze", help="embedding diversity of trained runs (Wang, Gong & Liu 2019, Figure 1): figure + JSON; or --subspace")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by reglm train")
    p.add_argument("--out", default="analysis", help="directory for embedding-diversity.png and .json (default: analysis/)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--labels", help="comma-separated legend labels, one per run (default: the run directory names)")
    p.add_argument("--top", type=int, metavar="K", help="analyze only the K most frequent training words (default: every word, as the paper)")
    p.add_argument("--subspace", action="store_true", help="instead: the subspace distance between the input embedding L^T and the output projection W (Inan et al. 2017, appendix B) -> subspace.json")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of a table")

    p = sub.add_parser("train-discriminator", help="train a discriminator against a trained model (Popov & Kudinov 2019, eq. 6)")
    p.add_argument("run", help="the language model's run directory (or model directory): the frozen q0")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--preset", default="discriminator", help="training settings (default: discriminator, the paper's PTB settings; discriminator-wt2)")
    p.add_argument("--init-from-model", action="store_true", help="start from the language model's weights instead of a fresh initialization")
    p.add_argument("--out", help="run directory (default: runs/discriminator-<time>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training overrides, e.g. train.lr=0.5 model.hidden_dropout=0")

    p = sub.add_parser("finetune", help="fine-tune a trained model with a discriminator-estimated reverse KL (Popov & Kudinov 2019, eq. 12)")
    p.add_argument("run", help="the language model's run directory (or model directory): the starting point q0")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--discriminator", metavar="DISC_RUN", help="a run of `reglm train-discriminator` for this model")
    how.add_argument("--without-discriminator", action="store_true", help="r = 1/2 everywhere (the paper's ablation, Table 2)")
    how.add_argument("--cross-entropy", action="store_true", help="fine-tune with cross-entropy only (the baseline of the paper's section 3)")
    p.add_argument("--preset", default="dfinetune", help="training settings (default: dfinetune, the paper's PTB settings; dfinetune-wt2)")
    p.add_argument("--out", help="run directory (default: runs/finetune-<time>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training overrides, e.g. train.lr=0.1 model.hidden_dropout=0.3")

    add_study_parser(sub)

    p = sub.add_parser("data", help="download built-in corpora or describe a corpus")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("download", help="download and verify a built-in corpus")
    d.add_argument("name")
    d.add_argument("--data-dir")
    d = dsub.add_parser("info", help="token counts, vocabulary size and OOV rate of a corpus")
    d.add_argument("name")
    d.add_argument("--data-dir")
    d.add_argument("--min-freq", type=int, default=1)
    d.add_argument("--max-vocab", type=int)
    d.add_argument("--json", action="store_true")

    sub.add_parser("presets", help="list the bundled presets and the paper/table each reproduces")
    sub.add_parser("config", help="list every configuration option with its default")
    return parser


@contextmanager
def _stop_on_signals() -> Iterator[Any]:
    """A :class:`~reglm.train.loop.StopRequest` that SIGINT/SIGTERM set: the first signal asks the
    trainer to checkpoint at the end of its step, a second one aborts at once."""
    from reglm.train.run import StopRequest

    stop = StopRequest()

    def handler(signum: int, _frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.request(signum)
        print("reglm: stop requested: saving a checkpoint at the end of this step (send again to abort without saving)", file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def cmd_train(args: argparse.Namespace) -> int:
    from reglm.config import build_config
    from reglm.train.run import resume, train

    if args.resume:
        if args.preset or args.overrides or args.data or args.out:
            raise ReglmError("--resume continues a run with its saved configuration; drop --preset/--data/--out/overrides")
        with _stop_on_signals() as stop:
            resume(Path(args.resume), stop=stop)
        return 0
    extra = list(args.overrides)
    for flag, key in (("data", "data.name"), ("data_dir", "data.data_dir"), ("min_freq", "data.min_freq"), ("max_vocab", "data.max_vocab")):
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={value}")
    config = build_config(args.preset, extra)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.preset or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    with _stop_on_signals() as stop:
        train(config, out, stop=stop)
    return 0


def _continue_from(run: str, checkpoint: str, preset: str, overrides: list[str], objective: dict[str, Any], what: str, out: str | None) -> None:
    """Train a run that starts from the trained model in ``run`` (a discriminator, a fine-tuning)."""
    from reglm.api import model_dir, require_language_model
    from reglm.config import RunConfig, derive_config
    from reglm.train.checkpoint import read_model_meta
    from reglm.train.run import train

    directory = model_dir(run, checkpoint).resolve()
    base = RunConfig.from_dict(read_model_meta(directory)["config"], source=str(directory))
    require_language_model(base.objective.kind, directory)
    config = derive_config(base, preset, overrides, {"base_model": str(directory), **objective}, what)
    with _stop_on_signals() as stop:
        train(config, Path(out) if out else Path("runs") / f"{objective['kind']}-{time.strftime('%Y%m%d-%H%M%S')}", stop=stop)


def cmd_train_discriminator(args: argparse.Namespace) -> int:
    objective = {"kind": "discriminator", "init_from_base": args.init_from_model}
    _continue_from(args.run, args.checkpoint, args.preset, args.overrides, objective, "a discriminator", args.out)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from reglm.api import model_dir

    if args.cross_entropy:
        objective: dict[str, Any] = {"kind": "lm"}
    else:
        disc = None if args.without_discriminator else str(model_dir(args.discriminator, "best").resolve())
        objective = {"kind": "reverse-kl", "discriminator": disc}
    _continue_from(args.run, args.checkpoint, args.preset, args.overrides, objective, "fine-tuning", args.out)
    return 0


@dataclass
class _EvalContext:
    """What every evaluation mode needs: the model on its device, the split and its batching."""

    model: LanguageModel
    ids: torch.Tensor
    """(N,) the split to score"""
    split: str
    batch_size: int
    bptt: int
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

    return _EvalOutcome(evaluate(ctx.model, ctx.ids, ctx.batch_size, ctx.bptt, ctx.device, keep_token_nll=ctx.keep_token_nll, progress=ctx.progress, desc=ctx.split))


def _eval_cache(ctx: _EvalContext, spec: CacheSpec) -> _EvalOutcome:
    from reglm.evaluate.cache import cache_evaluate

    result = cache_evaluate(ctx.model, ctx.ids, spec, ctx.batch_size, ctx.bptt, ctx.device, keep_token_nll=ctx.keep_token_nll, progress=ctx.progress, desc=ctx.split)
    return _EvalOutcome(result, summary=f" | cache {spec} | model alone ppl {result.plain.ppl:.2f}", label="model+cache", baseline=result.plain)


def _eval_cache_search(ctx: _EvalContext, grid: CacheGrid) -> _EvalOutcome:
    from reglm.evaluate.cache import cache_search

    search = cache_search(ctx.model, ctx.valid_ids, grid, ctx.batch_size, ctx.bptt, ctx.device, progress=ctx.progress, desc="cache search (valid)")
    outcome = _eval_cache(ctx, search.best)
    outcome.report["search"] = {"split": "valid", "grid": grid.as_dict(), **search.as_dict()}
    outcome.lines.append(f"cache search on valid ({len(grid)} settings): best {search.best} | loss {search.loss:.4f} | ppl {search.ppl:.2f} | model alone ppl {search.model_ppl:.2f}")
    return outcome


def _dynamic_stats(ctx: _EvalContext, spec: DynamicSpec, option: str) -> dict[str, torch.Tensor] | None:
    from reglm.evaluate.dynamic import check_training_data, gradient_statistics

    if spec.variant == "sgd":
        return None
    check_training_data(ctx.train_ids, spec, option=option)
    return gradient_statistics(ctx.model, ctx.train_ids, spec, device=ctx.device, progress=ctx.progress)


def _run_dynamic(ctx: _EvalContext, spec: DynamicSpec, stats: dict[str, torch.Tensor] | None) -> _EvalOutcome:
    from reglm.evaluate.dynamic import dynamic_evaluate

    result = dynamic_evaluate(ctx.model, ctx.ids, spec, stats, ctx.device, keep_token_nll=ctx.keep_token_nll, progress=ctx.progress, desc=f"{ctx.split} (dynamic)")
    return _EvalOutcome(result, summary=f" | dynamic {spec.variant} lr={spec.lr:g} lambda={spec.lam:g} segment={spec.segment}", label="model+dynamic", report={"dynamic": spec.as_dict()})


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
    outcome.lines.append(f"dynamic search on valid ({len(grid)} settings): best lr={search.best.lr:g} lambda={search.best.lam:g} | loss {search.best_result.loss:.4f} | ppl {search.best_result.ppl:.2f}")
    return outcome


EVAL_MODES: dict[str, tuple[Callable[[_EvalContext, Any], _EvalOutcome], int | Callable[[Any], int] | None]] = {
    "plain": (_eval_plain, None),
    "cache": (_eval_cache, 1),
    "cache-search": (_eval_cache_search, 1),
    "dynamic": (_eval_dynamic, lambda spec: spec.batch_size),
    "dynamic-search": (_eval_dynamic_search, lambda grid: grid.spec.batch_size),
}
"""``reglm eval`` modes: name -> (runner, default streams per batch: a number, a function of the
mode's setting, or None for the run's eval/test batch size)."""


def _eval_mode(args: argparse.Namespace) -> tuple[str, Any]:
    """The evaluation mode and its parsed setting (validated before anything is loaded)."""
    from reglm.evaluate.cache import parse_cache_grid, parse_cache_spec
    from reglm.evaluate.dynamic import parse_dynamic_grid, parse_dynamic_spec

    if args.dynamic is not None:
        return "dynamic", parse_dynamic_spec(args.dynamic, "--dynamic")
    if args.dynamic_search is not None:
        return "dynamic-search", parse_dynamic_grid(args.dynamic_search, "--dynamic-search")
    if args.cache is not None:
        return "cache", parse_cache_spec(args.cache, "--cache")
    if args.cache_search is not None:
        return "cache-search", parse_cache_grid(args.cache_search, "--cache-search")
    return "plain", None


def _check_output_file(option: str, path: str | None) -> None:
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ReglmError(f"{option} {path} is a directory; give a file name")
    parent = next((p for p in target.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ReglmError(f"{option} {path}: {parent} is a file, not a directory; choose another path")


def _write_output(option: str, path: str, writer: Callable[[], None]) -> None:
    try:
        writer()
    except OSError as exc:
        raise ReglmError(f"cannot write {option} {path} ({exc.strerror or exc}); choose a writable path") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from reglm.api import model_dir, require_language_model
    from reglm.evaluate.word_probs import write_loss_deltas, write_word_probs
    from reglm.train.checkpoint import load_model_dir
    from reglm.train.results import truth_comparison
    from reglm.train.run import load_corpus, resolve_device

    mode, setting = _eval_mode(args)
    run_mode, default_batch_size = EVAL_MODES[mode]
    if args.cache_deltas is not None and mode not in ("cache", "cache-search"):
        raise ReglmError("--cache-deltas compares the cache with the model alone; add --cache SPEC or --cache-search")
    if args.batch_size is not None and args.batch_size < 1:
        raise ReglmError(f"--batch-size {args.batch_size} must be >= 1")
    _check_output_file("--word-probs", args.word_probs)
    _check_output_file("--cache-deltas", args.cache_deltas)
    if args.word_probs is not None and args.cache_deltas is not None and Path(args.word_probs).absolute() == Path(args.cache_deltas).absolute():
        raise ReglmError("--word-probs and --cache-deltas name the same file; give two paths")
    split = args.split or ("test" if mode.endswith("-search") else "valid")

    directory = model_dir(args.run, args.checkpoint)
    device = resolve_device("auto")
    model, config, vocab = load_model_dir(directory, device)
    require_language_model(config.objective.kind, directory)
    data = {key: value for key, value in (("name", args.data), ("data_dir", args.data_dir)) if value}
    config = config.replace({"data": data})
    corpus = load_corpus(config)
    if corpus.vocab != vocab:
        raise ReglmError(f"the checkpoint {directory} was built for another vocabulary ({len(vocab)} words) than corpus {config.data.name!r} gives ({len(corpus.vocab)}); evaluate on the corpus it was trained on")
    ids = getattr(corpus, split)
    if callable(default_batch_size):
        default_batch_size = default_batch_size(setting)
    batch_size = args.batch_size or default_batch_size or (config.train.eval_batch_size if split == "valid" else config.train.test_batch_size)
    truth = corpus.truth[split] if corpus.truth is not None else None
    keep = truth is not None or args.word_probs is not None or args.cache_deltas is not None
    ctx = _EvalContext(model, ids, split, batch_size, config.train.bptt, device, keep, sys.stderr.isatty() and not args.json, corpus.valid, corpus.train)
    outcome = run_mode(ctx, setting)
    result = outcome.result
    if args.word_probs is not None:
        _write_output("--word-probs", args.word_probs, lambda: write_word_probs(args.word_probs, result, ids, vocab))
    if args.cache_deltas is not None:
        _write_output("--cache-deltas", args.cache_deltas, lambda: write_loss_deltas(args.cache_deltas, result, outcome.baseline, ids, vocab))
    out = {"run": str(args.run), "checkpoint": str(directory), "split": split, "batch_size": batch_size, "mode": mode, **result.as_dict(), **outcome.report}
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
    print(f"{split}: loss {result.loss:.4f} | ppl {result.ppl:.2f} | tokens {result.tokens}{outcome.summary}")
    if truth is not None:
        s = out["synthetic"]
        print(f"words only: {outcome.label} ppl {s['model_word_ppl']:.2f} | true ppl {s['true_word_ppl']:.2f}")
    for key, path in (("word probabilities", args.word_probs), ("cache loss deltas", args.cache_deltas)):
        if path is not None:
            print(f"wrote {key} to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from reglm.api import load
    from reglm.data.vocab import EOS

    lm = load(args.run, args.checkpoint)
    tokens = lm.stream(args.words, args.temperature, args.seed, args.prompt)
    line_start = True
    for token in tokens:
        if token == EOS:
            sys.stdout.write("\n")
            line_start = True
        else:
            sys.stdout.write(token if line_start else " " + token)
            line_start = False
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from reglm.analysis.plots import plot_embedding_diversity
    from reglm.analysis.runs import analyze_run
    from reglm.io import write_json

    labels = _run_labels(args.labels, args.runs)
    if args.subspace:
        return _analyze_subspace(args, labels)
    if args.top is not None and args.top < 2:
        raise ReglmError(f"--top {args.top} must be >= 2: nearest neighbours need two words")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file; give a directory for embedding-diversity.png and .json")
    progress = sys.stderr.isatty() and not args.json
    records = [analyze_run(run, label, args.checkpoint, progress, args.top) for run, label in zip(args.runs, labels)]
    figure, data = out / "embedding-diversity.png", out / "embedding-diversity.json"
    try:
        plot_embedding_diversity(records, figure)
        write_json(data, {"figure": figure.name, "runs": records})
    except OSError as exc:
        raise ReglmError(f"cannot write into --out {out} ({exc.strerror or exc}); choose a writable directory") from None
    rows = [{key: r[key] for key in ("label", "path", "checkpoint", "vocab_size", "embedding_dim", "analyzed_words")} | r["summary"] for r in records]
    if args.json:
        print(json.dumps({"figure": str(figure), "data": str(data), "runs": rows}))
        return 0
    width = max(len("run"), *(len(row["label"]) for row in rows))
    print(f"{'run':{width}s} {'words':>8s} {'mean NN':>9s} {'median NN':>10s} {'eff. rank':>10s} {'best valid ppl':>15s}")
    for row in rows:
        print(f"{row['label']:{width}s} {row['analyzed_words']:8d} {row['nn_mean']:9.4f} {row['nn_median']:10.4f} {row['effective_rank']:10.2f} {row['best_valid_ppl']:15.2f}")
    print(f"wrote {figure} and {data}")
    return 0


def _analyze_subspace(args: argparse.Namespace, labels: list[str]) -> int:
    """``reglm analyze RUN... --subspace``: Inan et al.'s appendix-B distance of every run."""
    from reglm.analysis.subspace import embedding_subspace_distance
    from reglm.api import model_dir
    from reglm.io import write_json
    from reglm.train.checkpoint import load_model_dir

    if args.top is not None:
        raise ReglmError("--top selects words for the diversity analysis; the subspace distance uses whole matrices, drop --top")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file; give a directory for subspace.json")
    rows = []
    for run, label in zip(args.runs, labels):
        directory = model_dir(run, args.checkpoint)
        model, config, _ = load_model_dir(directory)
        rows.append({"label": label, "path": str(directory), "tied": config.model.output.tie_weights, "distance": embedding_subspace_distance(model)})
    data = out / "subspace.json"
    try:
        write_json(data, {"metric": "Inan et al. 2017, appendix B: d^2 = 1 - ||U^T V||_F^2 / C between span(L^T) and span(W)", "runs": rows})
    except OSError as exc:
        raise ReglmError(f"cannot write into --out {out} ({exc.strerror or exc}); choose a writable directory") from None
    if args.json:
        print(json.dumps({"data": str(data), "runs": rows}))
        return 0
    width = max(len("run"), *(len(row["label"]) for row in rows))
    print(f"{'run':{width}s} {'tied':>5s} {'subspace distance':>18s}")
    for row in rows:
        print(f"{row['label']:{width}s} {str(row['tied']).lower():>5s} {row['distance']:18.4f}")
    print(f"wrote {data}")
    return 0


def _run_labels(labels: str | None, runs: list[str]) -> list[str]:
    """``--labels a,b`` split into one label per run; by default each run directory's name."""
    if labels is None:
        return [Path(run).resolve().name or str(run) for run in runs]
    names = [name.strip() for name in labels.split(",")]
    if len(names) != len(runs):
        raise ReglmError(f"--labels gives {len(names)} label(s) for {len(runs)} run(s); give one label per run, separated by commas")
    if not all(names):
        raise ReglmError(f"--labels {labels!r} holds an empty label; give a non-empty label for every run")
    return names



def cmd_data(args: argparse.Namespace) -> int:
    from reglm.config import DataConfig
    from reglm.data import corpus_stats, download, resolve

    if args.data_command == "download":
        path = download(args.name, args.data_dir)
        print(f"{args.name}: verified files in {path}")
        return 0
    options = DataConfig(name=args.name, data_dir=args.data_dir, min_freq=args.min_freq, max_vocab=args.max_vocab)
    corpus = resolve(options.name, data_dir=options.data_dir, min_freq=options.min_freq, max_vocab=options.max_vocab)
    stats = corpus_stats(corpus)
    if args.json:
        print(json.dumps(stats))
    else:
        for key, value in stats.items():
            print(f"{key:24s} {value}")
    return 0


def cmd_presets(_args: argparse.Namespace) -> int:
    from reglm.config import list_presets

    for name, description in list_presets():
        print(f"{name:22s} {description}")
    return 0


def cmd_config(_args: argparse.Namespace) -> int:
    from reglm.config import describe_options

    print(describe_options())
    return 0


COMMANDS = {"train": cmd_train, "train-discriminator": cmd_train_discriminator, "finetune": cmd_finetune, "eval": cmd_eval, "generate": cmd_generate, "analyze": cmd_analyze, "study": cmd_study, "data": cmd_data, "presets": cmd_presets, "config": cmd_config}


FIXES = {
    errno.ENOSPC: "free some disk space (or choose another --out), then resume with `reglm train --resume RUN`",
    errno.EDQUOT: "free some of your disk quota (or choose another --out), then resume with `reglm train --resume RUN`",
    errno.EACCES: "check the permissions of that path, or choose another one",
    errno.EPERM: "check the permissions of that path, or choose another one",
    errno.EROFS: "that file system is read-only; choose a path on a writable one",
    errno.EEXIST: "that path already exists; choose another one",
    errno.ENOTDIR: "a part of that path is a file, not a directory; choose another path",
    errno.EISDIR: "that path is a directory; give a file name",
    errno.ENOENT: "check that the path exists",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the device reported an I/O error; check the disk, then resume",
}
"""What to tell the user for the OS errors a command can meet (writes keep the previous file)."""


def os_error_message(exc: OSError) -> str:
    """``exc`` as one line: the path, what went wrong and the fix."""
    where = f"{exc.filename}: " if exc.filename else ""
    reason = exc.strerror or str(exc)
    fix = FIXES.get(exc.errno or -1, "check the path and the disk, then try again")
    return f"{where}{reason}; {fix}"


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """SIGINT/SIGTERM held back while the block runs: the list it yields gets the signal numbers
    that arrived. A second signal exits at once, without unwinding. (A KeyboardInterrupt raised
    while a C extension initializes leaves it half-imported: a later ImportError, or a silently
    swallowed interrupt.)"""
    arrived: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if arrived:
            sys.stderr.write("reglm: aborted\n")
            os._exit(EXIT_INTERRUPTED)
        arrived.append(signum)

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield arrived
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


LIGHT_COMMANDS = ("presets", "config")
"""Commands that never import PyTorch."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # KEY=VALUE overrides given after an option of a command with a positional RUN
        # (`reglm finetune RUN --out D train.lr=1`): argparse leaves them unparsed.
        if not hasattr(args, "overrides") or any(item.startswith("-") or "=" not in item for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if args.command not in LIGHT_COMMANDS:
        with _signals_deferred() as arrived:
            import reglm.train.run  # noqa: F401  (PyTorch and the rest of the heavy imports)
        if arrived:
            print("reglm: aborted", file=sys.stderr)
            return EXIT_INTERRUPTED
    try:
        return COMMANDS[args.command](args)
    except TrainingDiverged as exc:
        print(f"reglm: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except ReglmError as exc:
        print(f"reglm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"reglm: error: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as exc:
        print(f"reglm: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("reglm: aborted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
