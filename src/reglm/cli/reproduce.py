"""``reglm reproduce PAPER:TABLE``: train a paper table's rows (resumably) and write ``table.md``
and ``table.json`` with the paper's numbers beside reglm's (:mod:`reglm.reproduce`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from reglm.cli.train import stop_on_signals
from reglm.errors import ReglmError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce", help="train a paper table's rows and print them beside the paper's numbers (resumable)"
    )
    p.add_argument(
        "target",
        metavar="PAPER:TABLE",
        help="e.g. merity:1, inan:2, popov:3 (`reglm presets --paper NAME` lists a paper's tables and rows)",
    )
    p.add_argument(
        "--rows",
        help="comma-separated row ids, or prefixes that end at a dash (ptb-small picks ptb-small-vd, ptb-small-al, "
        "...); default: every row",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--budget", type=int, metavar="EPOCHS", help="cap every stage of every run at this many epochs")
    budget.add_argument(
        "--minutes",
        type=float,
        metavar="M",
        help="give every run M / (number of runs) minutes of training; the best model so far is scored",
    )
    p.add_argument(
        "--scale",
        choices=["full", "reduced"],
        default="full",
        help="full: the papers' recipes (GPU); reduced: LSTM sizes / 4, epochs / 10 (a CPU shows a table's ordering)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="directory of the table: one run directory per run under runs/, table.md and table.json (rerun to resume)",
    )
    p.add_argument(
        "--data-dir", help="download cache or directory holding ptb/ and wikitext-2/ (data.data_dir of every run)"
    )
    p.add_argument("--device", help="auto, cpu, cuda (train.device of every run; default auto)")
    p.add_argument("--json", action="store_true", help="print table.json instead of table.md")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    import json

    from reglm.errors import TrainingInterrupted
    from reglm.reproduce import Budget, reproduce

    options = []
    if args.data_dir is not None:
        options.append(f"data.data_dir={Path(args.data_dir).expanduser().absolute()}")
    if args.device is not None:
        options.append(f"train.device={args.device}")
    rows = [item.strip() for item in args.rows.split(",") if item.strip()] if args.rows else None
    budget = Budget(args.budget, args.minutes)
    with stop_on_signals() as stop:
        try:
            result = reproduce(args.target, Path(args.out), rows, args.scale, budget, options, stop, progress=True)
        except TrainingInterrupted:
            print(f"reglm: reproduce interrupted; rerun the same command to resume ({args.out})", file=sys.stderr)
            raise
    if args.json:
        print(json.dumps(result.table))
    else:
        print(result.markdown, end="")
        print(f"wrote {result.directory / 'table.md'} and {result.directory / 'table.json'}", file=sys.stderr)
    records = result.table.get("records", [])  # a paper table's rows; a study's table (popov:1) has its own
    if records and all("missing" in record["reglm"] for record in records):
        unit = "minute" if args.minutes == 1 else "minutes"
        minutes = "its budget"
        if args.minutes:
            minutes = f"--minutes {args.minutes:g} ({args.minutes:g} {unit} for the table)"
        raise ReglmError(
            f"no row of {args.target} was scored: with {minutes} every run stopped before its first epoch ended, "
            "so no run has a model; "
            "rerun with a larger --minutes (or --budget EPOCHS)"
        )
    return 0
