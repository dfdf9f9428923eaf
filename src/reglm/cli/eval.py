"""``reglm eval``: a trained run on a split, alone or with an evaluation-time method (the neural
cache, dynamic evaluation), each an entry of :data:`reglm.evaluate.modes.MODES`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from reglm.cli.common import add_data_options, check_output_file, load_scored_run, refuse_inputs, write_output
from reglm.errors import ReglmError
from reglm.evaluate.modes import (
    FLAG_MODES,
    PLAIN,
    EvalContext,
    EvalMode,
    batch_size_for,
    reading_for,
    refuse_subwords,
)


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
        help="score in stateless blocks of at most L tokens, scored parts ending at sentence ends (Baevski & Auli; "
        "default with --context-window: the run's train.batching.block_size)",
    )
    add_data_options(p, with_vocab=False)
    modes = p.add_mutually_exclusive_group()
    for mode in FLAG_MODES:
        modes.add_argument(mode.flag, nargs="?", const="", metavar=mode.metavar, dest=mode.dest, help=mode.help)
    p.add_argument(
        "--cache-deltas",
        metavar="FILE",
        help="with --cache/--cache-search: write word, count, summed loss change (cache - model) per word type as "
        "TSV (AWD-LSTM Table 3)",
    )
    p.add_argument(
        "--word-probs",
        metavar="FILE",
        help="write position, line, index, word, prob, log_prob of every token of the split as TSV: "
        "the first scored after <eos>, then the N-1 targets of the perplexity",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def _eval_mode(args: argparse.Namespace) -> tuple[EvalMode, Any]:
    """The evaluation mode given and its parsed setting (validated before anything is loaded)."""
    for mode in FLAG_MODES:
        text = getattr(args, mode.dest)
        if text is not None:
            return mode, mode.parse(text, mode.flag)
    return PLAIN, None


def cmd_eval(args: argparse.Namespace) -> int:
    from reglm.data.batchings import eval_block, eval_reading
    from reglm.evaluate.perplexity import ReadingKind, truth_comparison
    from reglm.evaluate.sentences import sentence_log_probs
    from reglm.evaluate.word_probs import write_loss_deltas, write_word_probs
    from reglm.progress import plan

    mode, setting = _eval_mode(args)
    if args.cache_deltas is not None and not mode.baseline:
        raise ReglmError("--cache-deltas compares the cache with the model alone; add --cache SPEC or --cache-search")
    if args.batch_size is not None and args.batch_size < 1:
        raise ReglmError(f"--batch-size {args.batch_size} must be >= 1")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ReglmError(f"--max-tokens {args.max_tokens} must be >= 2 (the first token is context, the rest scored)")
    if args.block is not None and args.block < 1:
        raise ReglmError(f"--block {args.block} must be >= 1")
    if args.block is not None and not mode.blocks:
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
    if loaded.subword:
        refuse_subwords(mode, loaded.directory)
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
    batching = config.train.batching
    batch_size = batch_size_for(mode, setting, batching, split, args.batch_size)
    run_reading = eval_reading(batching, split, vocab.eos_id)
    reading = reading_for(mode, run_reading, eval_block(batching), vocab.eos_id, batch_size, args.block)
    truth = corpus.truth[split] if corpus.truth is not None else None
    keep = truth is not None or args.word_probs is not None or args.cache_deltas is not None
    if args.max_tokens is not None and reading.kind is not ReadingKind.BLOCKS and ids.numel() - 1 < batch_size:
        raise ReglmError(
            f"the first {ids.numel()} tokens of {split} (--max-tokens) are too few for {batch_size} streams; "
            "lower --batch-size or raise --max-tokens"
        )
    ctx = EvalContext(
        model,
        ids,
        split,
        batch_size,
        reading.bptt,
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
