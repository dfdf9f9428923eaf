"""``reglm analyze``: the embedding diversity of trained runs (Wang, Gong & Liu 2019, Figure 1) or
the subspace distance of their input and output embeddings (Inan et al. 2017, appendix B)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from reglm.cli.common import print_table, run_labels
from reglm.errors import ReglmError


def register(sub: Any) -> None:
    p = sub.add_parser("analyze", help="embedding diversity of trained runs (Wang, Gong & Liu 2019, Figure 1): figure + JSON; or --subspace")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by reglm train")
    p.add_argument("--out", default="analysis", help="directory for embedding-diversity.png and .json (default: analysis/)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--labels", help="comma-separated legend labels, one per run (default: the run directory names)")
    p.add_argument("--top", type=int, metavar="K", help="analyze only the K most frequent training words (default: every word, as the paper)")
    p.add_argument("--subspace", action="store_true", help="instead: the subspace distance between the input embedding L^T and the output projection W (Inan et al. 2017, appendix B) -> subspace.json")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of a table")
    p.set_defaults(func=cmd_analyze)


def cmd_analyze(args: argparse.Namespace) -> int:
    from reglm.analysis.plots import plot_embedding_diversity
    from reglm.analysis.runs import analyze_run
    from reglm.io import write_json

    labels = run_labels(args.labels, args.runs)
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
    print_table(rows, [("   words", "analyzed_words", "d"), ("  mean NN", "nn_mean", ".4f"), (" median NN", "nn_median", ".4f"), (" eff. rank", "effective_rank", ".2f"), (" best valid ppl", "best_valid_ppl", ".2f")])
    print(f"wrote {figure} and {data}")
    return 0


def _analyze_subspace(args: argparse.Namespace, labels: list[str]) -> int:
    """``reglm analyze RUN... --subspace``: Inan et al.'s appendix-B distance of every run."""
    from reglm.analysis.subspace import embedding_subspace_distance
    from reglm.rundir import model_dir
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
    print_table([{**row, "tied": str(row["tied"]).lower()} for row in rows], [(" tied", "tied", ""), (" subspace distance", "distance", ".4f")])
    print(f"wrote {data}")
    return 0


