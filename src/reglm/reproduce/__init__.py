"""``reglm reproduce PAPER:TABLE``: train a paper table's rows and put them beside its numbers.

The rows come from the bundled presets' ``paper:`` metadata (:func:`reglm.config.presets.table_rows`),
in the paper's order (:data:`reglm.papers.PAPERS`). Each row is evaluated as its metadata says:
the best model at the end of the run or of its main stage, plainly or with the neural cache,
dynamic evaluation or the top-10 next words.

Runs. A row's preset defines a run; a preset with ``starts_from`` defines a run that starts from
another preset's trained model (a re-training, a discriminator, a fine-tuning), which is planned
and trained first. Rows whose runs have the same configuration share one run, named after the
preset highest in the ``extends`` chain that still has that configuration (``awd-lstm-ptb-cache``
is scored on the ``awd-lstm-ptb`` run); a main-stage row whose preset only switches the
fine-tuning off (``awd-lstm-ptb-no-finetune``) reads the main-stage record of its parent's run when
that run is planned anyway. Every run is an ordinary run directory under ``OUT/runs/``: a rerun
skips a finished run (``results.json``), resumes an interrupted one, and re-scores a row only when
``OUT/rows/ID.json`` is missing or was measured on another run.

Scale and budget (every factor is a constant of :mod:`reglm.reproduce.plan`, and docs/reproduce.md states them):

* ``--scale reduced`` divides every LSTM size (embedding, hidden units, last layer) by
  :data:`WIDTH_FACTOR` and every epoch count (main stage, fine-tuning, a derived run's) by
  :data:`EPOCH_FACTOR`, and compresses the schedule with it: the decay starts after
  ``decay_start / f`` epochs at ``decay ** f`` per epoch, and the non-monotone intervals become
  ``n / f`` (at least 1). ``--scale full`` trains the recipes as the papers did.
* ``--budget E`` caps every stage at ``E`` epochs (the schedule is not compressed: the run
  stops early); ``--minutes M`` gives every planned run ``M / runs`` minutes of training and stops
  it there (its best model so far is scored; the row says so).

``OUT/reproduce.json`` records the table, the scale, the budget and the data options; another
table's directory, or the same table with other settings, is refused. The results are
``OUT/table.md`` and ``OUT/table.json``.

Modules: :mod:`~reglm.reproduce.plan` (rows, runs, scale factors), :mod:`~reglm.reproduce.runs`
(the output directory, training), :mod:`~reglm.reproduce.scoring` (the rows' scores and records),
:mod:`~reglm.reproduce.table` (``table.md``); :mod:`~reglm.reproduce.trigram` makes ``popov:1``,
a table made by one study's chain of runs rather than by preset rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reglm.io import write_json, write_text
from reglm.reproduce.plan import (
    EPOCH_FACTOR,
    RUNS,
    SCALES,
    WIDTH_FACTOR,
    Budget,
    Planner,
    RowPlan,
    Run,
    parse_target,
    select_rows,
)
from reglm.reproduce.runs import claim_out, new_manifest, save_ledger, say, train_runs
from reglm.reproduce.scoring import Scorer, device_of, row_record, score_rows
from reglm.reproduce.table import command_line, render_markdown

__all__ = [
    "EPOCH_FACTOR",
    "SCALES",
    "WIDTH_FACTOR",
    "Budget",
    "Planner",
    "Reproduction",
    "RowPlan",
    "Run",
    "Scorer",
    "render_markdown",
    "reproduce",
    "row_record",
    "select_rows",
]


@dataclass(frozen=True)
class Reproduction:
    """What :func:`reproduce` did: ``table.json``'s content, ``table.md``'s, and where they are."""

    table: dict[str, Any]
    markdown: str
    directory: Path


def reproduce(
    target: str,
    out: Path,
    rows: list[str] | None = None,
    scale: str = "full",
    budget: Budget | None = None,
    options: list[str] | None = None,
    stop: Any = None,
    progress: bool = False,
) -> Reproduction:
    """Train (or resume) and score the rows of ``target`` (``PAPER:TABLE``) in ``out``, and write
    ``table.md`` and ``table.json`` there. ``options`` are ``key=value`` options for every base run
    (``data.data_dir=...``, ``train.device=...``); ``stop`` a :class:`~reglm.train.run.StopRequest`."""
    budget = budget or Budget()
    options = list(options or [])
    paper, table, entry = parse_target(target)
    if entry.study == "trigram":
        from reglm.reproduce.trigram import reproduce_trigram

        table_json, markdown = reproduce_trigram(Path(out).absolute(), rows, scale, budget, options, progress, stop)
        return Reproduction(table_json, markdown, Path(out).absolute())
    selected = select_rows(paper, table, rows)
    out = Path(out).absolute()
    planner = Planner(out, scale, budget, options)
    plans = planner.plan(selected)
    manifest = new_manifest(paper, table, scale, budget, options)
    ledger = claim_out(out, manifest)

    def save() -> None:
        save_ledger(out, manifest, ledger)

    say(f"{target}: {len(plans)} row(s), {len(planner.runs)} run(s) in {out / RUNS}")
    train_runs(planner.runs, budget, ledger, save, stop, progress)
    records = score_rows(out, plans, ledger, progress)
    meta = {
        **manifest,
        "command": command_line(target, rows, scale, budget, options),
        "rows": [row.id for row in selected],
        "runs": len(planner.runs),
        "minutes": sum(ledger.get(run.name, {}).get("seconds", 0.0) for run in planner.runs) / 60,
        "devices": sorted({d for d in (device_of(run.directory) for run in planner.runs) if d}),
    }
    markdown = render_markdown(meta, records)
    table_json = {**meta, "records": records}
    write_json(out / "table.json", table_json)
    write_text(out / "table.md", markdown)
    return Reproduction(table_json, markdown, out)
