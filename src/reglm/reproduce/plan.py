"""The plan of a reproduction: the rows of a table, the runs they need at a scale and within a
budget (:class:`Planner`), and the factors of ``--scale reduced``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reglm.config import RunConfig, build_config, derive_config
from reglm.config.fields import divided
from reglm.config.presets import TableRow, preset_metadata, preset_parent, table_rows
from reglm.errors import ReglmError
from reglm.papers import PAPERS, Table

SCALES = ("full", "reduced")
WIDTH_FACTOR = 4
"""``--scale reduced``: every LSTM size is divided by this (rounded, at least 8)."""
EPOCH_FACTOR = 10
"""``--scale reduced``: every epoch count and non-monotone interval is divided by this (rounded, at least 1)."""
MANIFEST = "reproduce.json"
RUNS = "runs"
ROWS = "rows"
FINETUNE_FIELDS = ("finetune",)
"""Training options only the fine-tuning stage reads: a main-stage row ignores them."""
WIDTH_COMPONENTS = ("input", "encoder")
"""The model components whose widths (``widths()`` of their configs) ``--scale reduced`` divides;
the output layer's follow from theirs."""
EPOCH_COMPONENTS = ("schedule", "averaging")
"""The training components whose options count epochs (``fewer_epochs(factor)`` of their configs)."""


@dataclass(frozen=True)
class Budget:
    epochs: int | None = None
    minutes: float | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.minutes is not None:
            raise ReglmError("give --budget EPOCHS or --minutes M, not both")
        if self.epochs is not None and self.epochs < 1:
            raise ReglmError(f"--budget {self.epochs} must be a number of epochs >= 1")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ReglmError(f"--minutes {self.minutes} must be a number of minutes > 0")

    def as_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "minutes": self.minutes}


@dataclass
class Run:
    """One training run of the plan: its directory, configuration and the runs it starts from."""

    name: str
    """its directory's name: the preset it is the run of"""
    config: RunConfig
    directory: Path
    needs: tuple[Run, ...] = ()

    @property
    def key(self) -> str:
        return config_key(self.config)


@dataclass
class RowPlan:
    row: TableRow
    run: Run
    stage: str
    """where the row's model is read: ``final`` (the run's best model) or ``main`` (its main-stage record)"""
    full_params: int | None = None


def parse_target(text: str) -> tuple[str, str, Table]:
    """``"inan:1"`` -> ``("inan", "1", table)``; an unknown paper or table is a ReglmError."""
    paper, sep, table = text.partition(":")
    if not sep or not paper or not table:
        raise ReglmError(f"{text!r} is not PAPER:TABLE (e.g. inan:1); papers: {', '.join(PAPERS)}")
    if paper not in PAPERS:
        raise ReglmError(
            f"unknown paper {paper!r}; choose one of {', '.join(PAPERS)} (`reglm presets --paper NAME` lists a "
            "paper's tables)"
        )
    tables = PAPERS[paper].tables
    if table not in tables:
        raise ReglmError(f"{paper} has no table {table!r}; its tables are {', '.join(tables)}")
    return paper, table, tables[table]


def select_rows(paper: str, table: str, wanted: list[str] | None) -> list[TableRow]:
    """The rows of ``paper:table``, or those ``wanted`` names: a row id, or a prefix that ends at a
    dash (``ptb-small`` picks ``ptb-small-vd``, ``ptb-small-al``...). A table that needs a missing
    technique, or a name that matches no row, is a ReglmError."""
    entry = PAPERS[paper].tables[table]
    if entry.missing is not None:
        raise ReglmError(f"{paper}:{table} ({entry.caption}) needs a technique reglm lacks here: {entry.missing}")
    if entry.study is not None:
        raise ReglmError(
            f"{paper}:{table} ({entry.caption}) is one chain of runs, `reglm study {entry.study}`, not preset rows"
        )
    rows = table_rows(paper, table)
    if not wanted:
        return rows
    chosen: list[TableRow] = []
    for name in wanted:
        hits = [row for row in rows if row.id == name or row.id.startswith(f"{name}-")]
        if not hits:
            raise ReglmError(
                f"{paper}:{table} has no row {name!r}; its rows are {', '.join(row.id for row in rows)} (a prefix "
                f"such as {rows[0].id.rsplit('-', 1)[0]!r} picks a group)"
            )
        chosen.extend(row for row in hits if row not in chosen)
    return [row for row in rows if row in chosen]


def config_key(config: RunConfig, drop: tuple[str, ...] = ()) -> str:
    raw = config.to_dict()
    raw.pop("preset", None)
    for name in drop:
        raw["train"].pop(name, None)
    return json.dumps(raw, sort_keys=True)


def _options(prefix: str, values: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(f"{prefix}.{name}", value) for name, value in values.items()]


def epoch_overrides(config: RunConfig, scale: str, budget: Budget) -> list[tuple[str, Any]]:
    """The options that put a run's epochs (and the options of its components that count
    epochs, :data:`EPOCH_COMPONENTS`) at ``scale`` and within ``budget``."""
    t = config.train
    epochs, finetune_epochs = t.epochs, t.finetune.epochs
    out: list[tuple[str, Any]] = []
    if scale == "reduced":
        epochs, finetune_epochs = divided(epochs, EPOCH_FACTOR, 1), divided(finetune_epochs, EPOCH_FACTOR, 1)
        for name in EPOCH_COMPONENTS:
            out += _options(f"train.{name}", getattr(t, name).fewer_epochs(EPOCH_FACTOR))
    if budget.epochs is not None:
        epochs, finetune_epochs = min(epochs, budget.epochs), min(finetune_epochs, budget.epochs)
    return [*out, ("train.epochs", epochs), ("train.finetune.epochs", finetune_epochs)]


def width_options(config: RunConfig, preset: str) -> list[tuple[str, Any]]:
    """The widths of the components of ``config`` that have them (:data:`WIDTH_COMPONENTS`) as
    options; a component whose widths cannot be divided refuses the reduced scale."""
    m = config.model
    widths = {name: getattr(m, name).widths() for name in WIDTH_COMPONENTS}
    if None in widths.values():
        raise ReglmError(
            f"--scale reduced shrinks LSTM models with a word embedding; {preset} has a {m.encoder.kind} encoder "
            f"and a {m.input.kind} input: use --scale full"
        )
    return [option for name, values in widths.items() for option in _options(f"model.{name}", values)]


def reduced_widths(config: RunConfig, preset: str) -> list[tuple[str, Any]]:
    """``--scale reduced``: every width divided by :data:`WIDTH_FACTOR` (rounded, at least 8)."""
    return [(key, divided(value, WIDTH_FACTOR, 8)) for key, value in width_options(config, preset)]


class Planner:
    """The runs the rows of a table need, in ``out/runs``, at ``scale`` within ``budget``."""

    def __init__(self, out: Path, scale: str, budget: Budget, options: list[str]) -> None:
        if scale not in SCALES:
            raise ReglmError(f"--scale {scale!r} is unknown; choose one of {', '.join(SCALES)}")
        self.out, self.scale, self.budget, self.options = Path(out).absolute(), scale, budget, options
        self._runs: dict[str, Run] = {}
        self._configs: dict[str, tuple[RunConfig, tuple[Run, ...]]] = {}
        self.runs: list[Run] = []
        """every planned run, each after the runs it starts from"""

    def _configure(self, preset: str) -> tuple[RunConfig, tuple[Run, ...]]:
        """The configuration of ``preset``'s run at the plan's scale and budget, and the runs it starts from."""
        if preset not in self._configs:
            self._configs[preset] = self._configure_new(preset)
        return self._configs[preset]

    def _configure_new(self, preset: str) -> tuple[RunConfig, tuple[Run, ...]]:
        meta = preset_metadata(preset)
        starts = meta.starts_from
        if starts is None:
            config = build_config(preset, self.options)
            extra = reduced_widths(config, preset) if self.scale == "reduced" else []
            return build_config(preset, self.options, [*extra, *epoch_overrides(config, self.scale, self.budget)]), ()
        base = self.run(starts.run)
        needs = [base]
        objective: dict[str, Any] = {"kind": starts.objective, "base_model": str(base.directory / "best")}
        if starts.discriminator is not None:
            disc = self.run(starts.discriminator)
            needs.append(disc)
            objective["discriminator"] = str(disc.directory / "best")
        what = f"preset {preset}"
        # a preset that extends the base run's own (a re-training) would set its full sizes again
        sizes = width_options(base.config, starts.run) if self.scale == "reduced" else []
        config = derive_config(base.config, preset, [], objective, what, sizes)
        return derive_config(
            base.config, preset, [], objective, what, [*sizes, *epoch_overrides(config, self.scale, self.budget)]
        ), tuple(needs)

    def run(self, preset: str) -> Run:
        """The run of ``preset``: planned once, with the runs it starts from planned before it."""
        config, needs = self._configure(preset)
        key = config_key(config)
        if key not in self._runs:
            name, parent = preset, preset_parent(preset)
            while parent is not None and self._same(parent, key):
                name, parent = parent, preset_parent(parent)
            self._runs[key] = run = Run(name, self._configure(name)[0], self.out / RUNS / name, needs)
            self.runs.append(run)
        return self._runs[key]

    def _same(self, preset: str, key: str) -> bool:
        """Whether ``preset``'s run has the configuration ``key`` (a preset that cannot be planned has not)."""
        try:
            return config_key(self._configure(preset)[0]) == key
        except ReglmError:
            return False

    def plan(self, rows: list[TableRow]) -> list[RowPlan]:
        """The run of every row (the runs it needs planned in :attr:`runs`, in training order)."""
        plans = [RowPlan(row, self.run(row.preset), row.stage) for row in rows]
        for plan in plans:
            if plan.stage == "main" and not plan.run.config.train.finetune.enabled:
                # a run without fine-tuning: its final model is its main-stage model, unless a
                # planned run differs from it only by a fine-tuning stage and records that model
                main_key = config_key(plan.run.config, FINETUNE_FIELDS)
                sharing = [
                    run
                    for run in self.runs
                    if run.config.train.finetune.enabled and config_key(run.config, FINETUNE_FIELDS) == main_key
                ]
                if sharing:
                    plan.run = sharing[0]
                else:
                    plan.stage = "final"
        used = {id(run) for plan in plans for run in run_chain(plan.run)}
        self.runs = [run for run in self.runs if id(run) in used]
        for plan in plans:
            plan.full_params = _full_params(plan.row.preset, self.options)
        return plans


def run_chain(run: Run) -> list[Run]:
    return [dep for need in run.needs for dep in run_chain(need)] + [run]


def _base_preset(preset: str) -> str:
    starts = preset_metadata(preset).starts_from
    return preset if starts is None else _base_preset(starts.run)


def _full_params(preset: str, options: list[str]) -> int | None:
    """The parameter count of ``preset``'s model at full scale, on the meta device, for the
    vocabulary of its corpus when it is a built-in one (None otherwise)."""
    from reglm.data import SOURCES
    from reglm.data.synthetic import SYNTHETIC_VOCAB_SIZE
    from reglm.models import count_parameters

    config = build_config(_base_preset(preset), options)
    name = config.data.name
    vocab = SYNTHETIC_VOCAB_SIZE if name == "synthetic" else SOURCES[name].vocab_size if name in SOURCES else None
    return None if vocab is None else count_parameters(config.model, vocab)
