"""``reglm analyze``: the embedding diversity of trained runs (Wang, Gong & Liu 2019, Figure 1),
the subspace distance of their input and output embeddings (Inan et al. 2017, appendix B), or
their loss binned by word frequency (Baevski & Auli 2019, Figures 2 and 3)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from reglm.cli.common import add_data_options, load_scored_run, print_table, run_labels, writing_into
from reglm.errors import ReglmError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "analyze",
        help="embedding diversity of trained runs (Wang, Gong & Liu 2019, Figure 1): figure + JSON; or --subspace, "
        "or --by-frequency",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by reglm train")
    p.add_argument(
        "--out", default="analysis", help="directory for embedding-diversity.png and .json (default: analysis/)"
    )
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--labels", help="comma-separated legend labels, one per run (default: the run directory names)")
    p.add_argument(
        "--top",
        type=int,
        metavar="K",
        help="analyze only the K most frequent training words (default: every word, as the paper)",
    )
    p.add_argument(
        "--subspace",
        action="store_true",
        help="instead: the subspace distance between the input embedding L^T and the output projection W (Inan et "
        "al. 2017, appendix B) -> subspace.json",
    )
    p.add_argument(
        "--by-frequency",
        action="store_true",
        help="instead: the loss binned by the training frequency of each word and of the word before it "
        "(Baevski & Auli 2019, Figures 2 and 3) -> loss-by-frequency.png and .json",
    )
    p.add_argument(
        "--split",
        choices=["valid", "test"],
        default="test",
        help="with --by-frequency: the split to score (default: test, as the paper)",
    )
    add_data_options(p, with_vocab=False)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of a table")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    labels = run_labels(args.labels, args.runs)
    if args.subspace and args.by_frequency:
        raise ReglmError("--subspace and --by-frequency are two analyses; run them one at a time")
    if args.subspace:
        return _analyze_subspace(args, labels)
    if args.by_frequency:
        return _analyze_by_frequency(args, labels)
    from reglm.analysis.plots import plot_embedding_diversity  # matplotlib: only the analyses that draw
    from reglm.analysis.runs import analyze_run
    from reglm.io import write_json

    if args.top is not None and args.top < 2:
        raise ReglmError(f"--top {args.top} must be >= 2: nearest neighbours need two words")
    out = _out_dir(args.out, "embedding-diversity.png and .json")
    progress = True
    records = [analyze_run(run, label, args.checkpoint, progress, args.top) for run, label in zip(args.runs, labels)]
    figure, data = out / "embedding-diversity.png", out / "embedding-diversity.json"
    with writing_into(out):
        plot_embedding_diversity(records, figure)
        write_json(data, {"figure": figure.name, "runs": records})
    rows = [
        {key: r[key] for key in ("label", "path", "checkpoint", "vocab_size", "embedding_dim", "analyzed_words")}
        | r["summary"]
        for r in records
    ]
    if args.json:
        print(json.dumps({"figure": str(figure), "data": str(data), "runs": rows}))
        return 0
    print_table(
        rows,
        [
            ("   words", "analyzed_words", "d"),
            ("  mean NN", "nn_mean", ".4f"),
            (" median NN", "nn_median", ".4f"),
            (" eff. rank", "effective_rank", ".2f"),
            (" best valid ppl", "best_valid_ppl", ".2f"),
        ],
    )
    print(f"wrote {figure} and {data}")
    return 0


def _analyze_subspace(args: argparse.Namespace, labels: list[str]) -> int:
    """``reglm analyze RUN... --subspace``: Inan et al.'s appendix-B distance of every run."""
    from reglm.analysis.subspace import embedding_subspace_distance
    from reglm.io import write_json
    from reglm.modeldir import load_model_dir
    from reglm.rundir import model_dir

    if args.top is not None:
        raise ReglmError(
            "--top selects words for the diversity analysis; the subspace distance uses whole matrices, drop --top"
        )
    out = _out_dir(args.out, "subspace.json")
    rows = []
    for run, label in zip(args.runs, labels):
        directory = model_dir(run, args.checkpoint)
        model, config, _ = load_model_dir(directory)
        distance = embedding_subspace_distance(model)  # refuses output layers without one (V, H) matrix first
        rows.append(
            {"label": label, "path": str(directory), "tied": config.model.output.tie_weights, "distance": distance}
        )
    data = out / "subspace.json"
    with writing_into(out):
        write_json(
            data,
            {
                "metric": "Inan et al. 2017, appendix B: d^2 = 1 - ||U^T V||_F^2 / C between span(L^T) and span(W)",
                "runs": rows,
            },
        )
    if args.json:
        print(json.dumps({"data": str(data), "runs": rows}))
        return 0
    print_table(
        [{**row, "tied": str(row["tied"]).lower()} for row in rows],
        [(" tied", "tied", ""), (" subspace distance", "distance", ".4f")],
    )
    print(f"wrote {data}")
    return 0


def _analyze_by_frequency(args: argparse.Namespace, labels: list[str]) -> int:
    """``reglm analyze RUN... --by-frequency``: Baevski & Auli's Figures 2 and 3 for every run."""
    from reglm.analysis.frequency import frequency_analysis
    from reglm.analysis.plots import plot_loss_by_frequency
    from reglm.data.batchings import eval_reading
    from reglm.io import write_json

    if args.top is not None:
        raise ReglmError(
            "--top selects words for the diversity analysis; --by-frequency bins every scored word, drop --top"
        )
    out = _out_dir(args.out, "loss-by-frequency.png and .json")
    progress = True
    records = []
    for run, label in zip(args.runs, labels):
        loaded = load_scored_run(run, args.checkpoint, args.data, args.data_dir)
        reading = eval_reading(loaded.config.train.batching, args.split, loaded.vocab.eos_id)
        record = frequency_analysis(loaded.model, loaded.corpus, args.split, reading, loaded.device, progress)
        records.append({"label": label, "path": str(loaded.directory), **record})
    figure, data = out / "loss-by-frequency.png", out / "loss-by-frequency.json"
    with writing_into(out):
        plot_loss_by_frequency(records, figure)
        write_json(
            data,
            {
                "figure": figure.name,
                "loss": "mean NLL (nats) of the words in each bin of training counts",
                "runs": records,
            },
        )
    if args.json:
        print(json.dumps({"figure": str(figure), "data": str(data), "runs": records}))
        return 0
    bins = records[0]["by_frequency"]["bins"]
    rows = [{"label": r["label"], "ppl": r["ppl"], **dict(zip(bins, r["by_frequency"]["mean_loss"]))} for r in records]
    print_table(rows, [(" ppl", "ppl", ".2f"), *((f" {b:>6s}", b, ".3f") for b in bins)])
    print(
        f"(mean loss by training frequency of the word, {args.split}; -: no word of the split in that bin); "
        f"wrote {figure} and {data}"
    )
    return 0


def _out_dir(path: str, what: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file; give a directory for {what}")
    return out
