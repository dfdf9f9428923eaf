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

Scale and budget (every factor is a constant below, and docs/reproduce.md states them):

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
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reglm.config import RunConfig, build_config, derive_config, load_config_file
from reglm.config.presets import TableRow, preset_metadata, preset_parent, table_rows
from reglm.errors import ReglmError, TrainingInterrupted
from reglm.io import write_json, write_text
from reglm.papers import PAPERS, Table
from reglm.rundir import CONFIG_FILE, ENVIRONMENT_FILE, METRICS_FILE, RESULTS_FILE, is_run

SCALES = ("full", "reduced")
WIDTH_FACTOR = 4
"""``--scale reduced``: every LSTM size is divided by this (rounded, at least 8)."""
EPOCH_FACTOR = 10
"""``--scale reduced``: every epoch count and non-monotone interval is divided by this (rounded, at least 1)."""
MANIFEST = "reproduce.json"
RUNS = "runs"
ROWS = "rows"
FINETUNE_FIELDS = ("finetune", "finetune_epochs", "finetune_lr", "advsoft_finetune", "finetune_input_noise_std")
"""Training options only the fine-tuning stage reads: a main-stage row ignores them."""
LSTM_ENCODERS = ("awd-lstm", "vd-lstm")


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
        return _config_key(self.config)


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
        raise ReglmError(f"unknown paper {paper!r}; choose one of {', '.join(PAPERS)} (`reglm presets --paper NAME` lists a paper's tables)")
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
    rows = table_rows(paper, table)
    if not wanted:
        return rows
    chosen: list[TableRow] = []
    for name in wanted:
        hits = [row for row in rows if row.id == name or row.id.startswith(f"{name}-")]
        if not hits:
            raise ReglmError(f"{paper}:{table} has no row {name!r}; its rows are {', '.join(row.id for row in rows)} (a prefix such as {rows[0].id.rsplit('-', 1)[0]!r} picks a group)")
        chosen.extend(row for row in hits if row not in chosen)
    return [row for row in rows if row in chosen]


def _config_key(config: RunConfig, drop: tuple[str, ...] = ()) -> str:
    raw = config.to_dict()
    raw.pop("preset", None)
    for name in drop:
        raw["train"].pop(name, None)
    return json.dumps(raw, sort_keys=True)


def _half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _shrink(value: int) -> int:
    return max(8, _half_up(value / WIDTH_FACTOR))


def _fewer(value: int) -> int:
    return max(1, _half_up(value / EPOCH_FACTOR))


def epoch_overrides(config: RunConfig, scale: str, budget: Budget) -> list[str]:
    """The options that put a run's epochs (and its schedule) at ``scale`` and within ``budget``."""
    t = config.train
    epochs, finetune_epochs = t.epochs, t.finetune_epochs
    out = []
    if scale == "reduced":
        epochs, finetune_epochs = _fewer(epochs), _fewer(finetune_epochs)
        if t.schedule.kind == "decay":
            out += [f"train.schedule.decay_start={_half_up(t.schedule.decay_start / EPOCH_FACTOR)}", f"train.schedule.decay={t.schedule.decay ** EPOCH_FACTOR!r}",
                    f"train.schedule.nonmono_interval={_fewer(t.schedule.nonmono_interval)}"]
        if t.averaging.kind == "ntasgd":
            out.append(f"train.averaging.nonmono={_fewer(t.averaging.nonmono)}")
    if budget.epochs is not None:
        epochs, finetune_epochs = min(epochs, budget.epochs), min(finetune_epochs, budget.epochs)
    return [*out, f"train.epochs={epochs}", f"train.finetune_epochs={finetune_epochs}"]


def _size_options(config: RunConfig, shrink: Any = int) -> list[str]:
    """The LSTM sizes of ``config`` as options, each passed through ``shrink``."""
    m = config.model
    out = [f"model.input.emb_size={shrink(m.input.emb_size)}", f"model.encoder.hidden_size={shrink(m.encoder.hidden_size)}"]
    last = getattr(m.encoder, "last_hidden_size", None)
    if last is not None:
        out.append(f"model.encoder.last_hidden_size={shrink(last)}")
    return out


def width_overrides(config: RunConfig, preset: str) -> list[str]:
    """``--scale reduced``: every LSTM size divided by :data:`WIDTH_FACTOR`."""
    m = config.model
    if m.encoder.kind not in LSTM_ENCODERS or m.input.kind != "embedding":
        raise ReglmError(f"--scale reduced shrinks LSTM models with a word embedding; {preset} has a {m.encoder.kind} encoder and a {m.input.kind} input: use --scale full")
    return _size_options(config, _shrink)


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
            extra = width_overrides(config, preset) if self.scale == "reduced" else []
            return build_config(preset, [*self.options, *extra, *epoch_overrides(config, self.scale, self.budget)]), ()
        base = self.run(starts.run)
        needs = [base]
        objective: dict[str, Any] = {"kind": starts.objective, "base_model": str(base.directory / "best")}
        if starts.objective == "reverse-kl":
            objective["discriminator"] = None
            if starts.discriminator is not None:
                disc = self.run(starts.discriminator)
                needs.append(disc)
                objective["discriminator"] = str(disc.directory / "best")
        what = f"preset {preset}"
        # a preset that extends the base run's own (a re-training) would set its full sizes again
        sizes = _size_options(base.config) if self.scale == "reduced" else []
        config = derive_config(base.config, preset, sizes, objective, what)
        return derive_config(base.config, preset, [*sizes, *epoch_overrides(config, self.scale, self.budget)], objective, what), tuple(needs)

    def run(self, preset: str) -> Run:
        """The run of ``preset``: planned once, with the runs it starts from planned before it."""
        config, needs = self._configure(preset)
        key = _config_key(config)
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
            return _config_key(self._configure(preset)[0]) == key
        except ReglmError:
            return False

    def plan(self, rows: list[TableRow]) -> list[RowPlan]:
        """The run of every row (the runs it needs planned in :attr:`runs`, in training order)."""
        plans = [RowPlan(row, self.run(row.preset), row.stage) for row in rows]
        for plan in plans:
            if plan.stage == "main" and not plan.run.config.train.finetune:
                # a run without fine-tuning: its final model is its main-stage model, unless a
                # planned run differs from it only by a fine-tuning stage and records that model
                main_key = _config_key(plan.run.config, FINETUNE_FIELDS)
                sharing = [run for run in self.runs if run.config.train.finetune and _config_key(run.config, FINETUNE_FIELDS) == main_key]
                if sharing:
                    plan.run = sharing[0]
                else:
                    plan.stage = "final"
        used = {id(run) for plan in plans for run in _chain(plan.run)}
        self.runs = [run for run in self.runs if id(run) in used]
        for plan in plans:
            plan.full_params = _full_params(plan.row.preset, self.options)
        return plans


def _chain(run: Run) -> list[Run]:
    return [dep for need in run.needs for dep in _chain(need)] + [run]


def _base_preset(preset: str) -> str:
    starts = preset_metadata(preset).starts_from
    return preset if starts is None else _base_preset(starts.run)


def _full_params(preset: str, options: list[str]) -> int | None:
    """The parameter count of ``preset``'s model at full scale, on the meta device, for the
    vocabulary of its corpus when it is a built-in one (None otherwise)."""
    from reglm.cli.data import SYNTHETIC_VOCAB_SIZE
    from reglm.data import SOURCES
    from reglm.models import count_parameters

    config = build_config(_base_preset(preset), options)
    name = config.data.name
    vocab = SYNTHETIC_VOCAB_SIZE if name == "synthetic" else SOURCES[name].vocab_size if name in SOURCES else None
    return None if vocab is None else count_parameters(config.model, vocab)


# ---------------------------------------------------------------------- the output directory


def _manifest(paper: str, table: str, scale: str, budget: Budget, options: list[str]) -> dict[str, Any]:
    return {"table": f"{paper}:{table}", "scale": scale, "budget": budget.as_dict(), "options": options}


def claim_out(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Check ``out`` for ``manifest`` (new, empty, or started for the same table and settings) and
    record it; returns the ledger of the runs' seconds of training."""
    out = Path(out)
    path = out / MANIFEST
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file; give a directory for the table's runs")
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ReglmError(f"{path} cannot be read ({exc}); give another --out") from None
        if saved.get("table") != manifest["table"]:
            raise ReglmError(f"--out {out} holds the runs of {saved.get('table')}, not {manifest['table']}; give another --out")
        changed = [key for key in ("scale", "budget", "options") if saved.get(key) != manifest[key]]
        if changed:
            shown = "; ".join(f"{key}: {_setting(key, saved.get(key))}, now {_setting(key, manifest[key])}" for key in changed)
            raise ReglmError(f"--out {out} holds runs of {manifest['table']} made with other settings ({shown}); rerun with those settings to resume it, or give another --out")
        return saved.get("ledger", {})
    if out.is_dir() and any(out.iterdir()):
        raise ReglmError(f"--out {out} is not empty and holds no `reglm reproduce` table ({MANIFEST}); give a new or empty directory")
    write_json(path, {**manifest, "ledger": {}})
    return {}


def _setting(key: str, value: Any) -> str:
    if key == "budget" and isinstance(value, dict):
        return f"--budget {value['epochs']}" if value.get("epochs") else f"--minutes {value['minutes']:g}" if value.get("minutes") else "no budget"
    if key == "options":
        return " ".join(value) if value else "no data or device options"
    return str(value)


def _save_ledger(out: Path, manifest: dict[str, Any], ledger: dict[str, Any]) -> None:
    write_json(Path(out) / MANIFEST, {**manifest, "ledger": ledger})


# ---------------------------------------------------------------------- training


class _Deadline:
    """A stop request for the trainer (:class:`~reglm.train.trainer.StopRequest`'s interface): the
    user's (SIGINT/SIGTERM), or the end of a time budget, which reads as SIGALRM."""

    def __init__(self, user: Any, seconds: float | None) -> None:
        self.user = user
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self._signum: int | None = None

    @property
    def signum(self) -> int | None:
        if self._signum is None:
            if self.user is not None and self.user.signum is not None:
                self._signum = self.user.signum
            elif self.deadline is not None and time.monotonic() >= self.deadline:
                self._signum = signal.SIGALRM
        return self._signum

    def request(self, signum: int) -> None:
        self._signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def by_user(self) -> bool:
        return self.user is not None and self.user.signum is not None


def _say(text: str) -> None:
    print(f"reproduce: {text}", file=sys.stderr, flush=True)


def train_runs(runs: list[Run], budget: Budget, ledger: dict[str, Any], save: Any, stop: Any = None, progress: bool = False) -> None:
    """Train every run that is not finished: start it, or resume it; a run whose time budget
    is spent, or that starts from a run without a model, is left as it is."""
    from reglm.train.run import resume, train

    share = None if budget.minutes is None else budget.minutes * 60 / len(runs)
    for i, run in enumerate(runs, 1):
        entry = ledger.setdefault(run.name, {"seconds": 0.0, "status": "planned"})
        if is_run(run.directory) and _config_key(load_config_file(run.directory / CONFIG_FILE)) != run.key:
            raise ReglmError(f"{run.directory} was trained with another configuration than the preset {run.name} now gives (was it edited?); give another --out")
        if (run.directory / RESULTS_FILE).is_file() or entry["status"] == "budget":
            entry["status"] = "done" if (run.directory / RESULTS_FILE).is_file() else entry["status"]
            _say(f"run {i}/{len(runs)} {run.name}: {entry['status']}, skipped")
            continue
        missing = [need.name for need in run.needs if not (need.directory / "best").is_dir()]
        if missing:
            entry["status"] = "blocked"
            _say(f"run {i}/{len(runs)} {run.name}: not started, {', '.join(missing)} has no trained model (its time budget ended before its first epoch)")
            continue
        left = None if share is None else share - entry["seconds"]
        if left is not None and left <= 0:
            entry["status"] = "budget"
            _say(f"run {i}/{len(runs)} {run.name}: its {share / 60:.1f} minutes are spent")
            continue
        deadline = _Deadline(stop, left)
        _say(f"run {i}/{len(runs)} {run.name}: {'resuming' if is_run(run.directory) else 'training'}" + ("" if left is None else f", {left / 60:.1f} min left"))
        started = time.monotonic()
        try:
            if is_run(run.directory):
                resume(run.directory, progress, deadline)
            else:
                train(run.config, run.directory, progress, deadline)
            entry["status"] = "done"
        except TrainingInterrupted:
            if deadline.by_user:
                raise
            entry["status"] = "budget"
            _say(f"run {run.name}: its {share / 60:.1f} minutes are spent; its best model so far is scored")
        finally:
            entry["seconds"] += time.monotonic() - started
            save()


# ---------------------------------------------------------------------- scoring the rows


def _epochs(run_dir: Path) -> dict[str, int]:
    """Epochs trained per stage, from the run's ``metrics.jsonl``."""
    counts = {"main": 0, "finetune": 0}
    path = run_dir / METRICS_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record.get("event") == "epoch":
                counts[record.get("stage", "main")] = counts.get(record.get("stage", "main"), 0) + 1
    return counts


def _device(run_dir: Path) -> str | None:
    try:
        sessions = json.loads((run_dir / ENVIRONMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    last = sessions[-1] if isinstance(sessions, list) and sessions else {}
    device = last.get("device")
    if device is None:
        return None
    return f"{device} ({last['gpu']})" if last.get("gpu") else f"{device} ({last.get('cpu_count')} cores, {last.get('torch_threads')} threads)"


class Scorer:
    """Scores rows on their runs' models, loading each model and corpus once."""

    def __init__(self, progress: bool = False) -> None:
        self.progress = progress
        self._corpora: dict[Any, Any] = {}

    def corpus(self, config: RunConfig) -> Any:
        from reglm.train.setup import load_corpus

        if config.data not in self._corpora:
            self._corpora[config.data] = load_corpus(config)
        return self._corpora[config.data]

    def score(self, plan: RowPlan) -> dict[str, Any]:
        """``{"valid", "test", "params", ...}`` of ``plan``'s row on its run's model."""
        run, row = plan.run, plan.row
        best = run.directory / "best"
        if not best.is_dir():
            return {"missing": "no trained model (the run's time budget ended before its first epoch)"}
        results = _read_json(run.directory / RESULTS_FILE)
        if row.evaluation == "plain" and results is not None:
            record = results.get("main") if plan.stage == "main" else results
            if record is None:
                return {"missing": "the run recorded no main-stage scores"}
            out = {"valid": record["valid"]["ppl"], "test": record["test"]["ppl"]}
        else:
            out = self._measure(plan)
        from reglm.train.checkpoint import load_model_dir

        model, _, _ = load_model_dir(best)
        return {**out, "params": model.num_parameters()}

    def _measure(self, plan: RowPlan) -> dict[str, Any]:
        import torch

        from reglm.evaluate.perplexity import evaluate
        from reglm.train.batching import eval_reading
        from reglm.train.checkpoint import load_model_dir
        from reglm.train.setup import resolve_device

        row, run = plan.row, plan.run
        device = resolve_device(run.config.train.device)
        model, config, vocab = load_model_dir(run.directory / "best", device)
        corpus = self.corpus(config)
        bptt = config.train.bptt
        if row.evaluation == "plain":
            from reglm.train.results import main_stage_record

            record = main_stage_record(run.directory) if plan.stage == "main" else None
            if record is not None:
                return {"valid": record["valid"]["ppl"], "test": record["test"]["ppl"], "note": "time budget spent in the fine-tuning stage: its main-stage record"}
            scores = {split: evaluate(model, getattr(corpus, split), device=device, progress=self.progress, desc=split, word_ends=corpus.split_word_ends(split),
                                      reading=eval_reading(config.train, split, vocab.eos_id)).ppl for split in ("valid", "test")}
            return {**scores, "note": "time budget spent: the best model so far"}
        if row.evaluation in ("cache", "cache-search"):
            from reglm.evaluate.cache import cache_evaluate, cache_search, parse_cache_grid, parse_cache_spec

            if row.evaluation == "cache":
                spec = parse_cache_spec(row.spec or "", f"preset {row.preset}: paper.spec")
                valid = cache_evaluate(model, corpus.valid, spec, 1, bptt, device, progress=self.progress, desc="valid (cache)").ppl
            else:
                search = cache_search(model, corpus.valid, parse_cache_grid(row.spec or "", f"preset {row.preset}: paper.spec"), 1, bptt, device, progress=self.progress)
                spec, valid = search.best, search.ppl
            test = cache_evaluate(model, corpus.test, spec, 1, bptt, device, progress=self.progress, desc="test (cache)").ppl
            return {"valid": valid, "test": test, "setting": str(spec)}
        if row.evaluation in ("dynamic", "dynamic-search"):
            from reglm.evaluate.dynamic import dynamic_evaluate, dynamic_search, gradient_statistics
            from reglm.evaluate.dynamic_spec import check_training_data, parse_dynamic_grid, parse_dynamic_spec

            option = f"preset {row.preset}: paper.spec"
            grid = parse_dynamic_grid(row.spec or "", option) if row.evaluation == "dynamic-search" else None
            spec = grid.spec if grid is not None else parse_dynamic_spec(row.spec or "", option)
            stats = None
            if spec.variant != "sgd":
                check_training_data(corpus.train, spec, option=option)
                stats = gradient_statistics(model, corpus.train, spec, device=device, progress=self.progress)
            if grid is not None:
                search = dynamic_search(model, corpus.valid, grid, stats, device, progress=self.progress)
                spec, valid = search.best, search.best_result.ppl
            else:
                valid = dynamic_evaluate(model, corpus.valid, spec, stats, device, progress=self.progress, desc="valid (dynamic)").ppl
            test = dynamic_evaluate(model, corpus.test, spec, stats, device, progress=self.progress, desc="test (dynamic)").ppl
            return {"valid": valid, "test": test, "setting": f"{spec.variant} lr={spec.lr:g} lambda={spec.lam:g}"}
        from reglm.api import load

        lm = load(run.directory / "best", device=device)
        table = PAPERS[row.paper].tables[row.table]
        with torch.no_grad():
            top = [", ".join(f"{word} {math.exp(logp):.2f}" for word, logp in lm.next_words(phrase, 10, exclude=())) for phrase in table.phrases]
        return {"top10": top}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def score_rows(out: Path, plans: list[RowPlan], ledger: dict[str, Any], progress: bool = False) -> list[dict[str, Any]]:
    """Every row's record (cached in ``out/rows/ID.json`` while its run is unchanged)."""
    scorer = Scorer(progress)
    records = []
    for plan in plans:
        run, row = plan.run, plan.row
        path = Path(out) / ROWS / f"{row.id}.json"
        entry = ledger.get(run.name, {})
        fingerprint = {"run": run.name, "stage": plan.stage, "evaluation": row.evaluation, "spec": row.spec, "status": entry.get("status"), "epochs": _epochs(run.directory)}
        cached = _read_json(path)
        if cached is not None and cached.get("fingerprint") == fingerprint:
            ours = cached["ours"]
        else:
            if entry.get("status") in ("done", "budget"):
                _say(f"scoring row {row.id} ({row.evaluation}, {plan.stage} model of {run.name})")
            ours = _not_trained(entry) or scorer.score(plan)
            write_json(path, {"fingerprint": fingerprint, "ours": ours})
        records.append(_record(plan, ours, ledger))
    return records


def _not_trained(entry: dict[str, Any]) -> dict[str, Any] | None:
    status = entry.get("status")
    if status == "blocked":
        return {"missing": "not trained: the run it starts from has no model"}
    if status not in ("done", "budget"):
        return {"missing": "not trained"}
    return None


def _minutes(ledger: dict[str, Any], run: Run) -> float:
    return round(ledger.get(run.name, {}).get("seconds", 0.0) / 60, 2)


def _earlier_runs(run: Run, ledger: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs ``run`` starts from (recursively, in training order): epochs, minutes, and the
    validation and test perplexity of their best model when they have one."""
    out = []
    for need in {need.name: need for need in _chain(run)[:-1]}.values():
        results = _read_json(need.directory / RESULTS_FILE) or {}
        ppl = {split: results.get(split, {}).get("ppl") for split in ("valid", "test")}
        out.append({"run": need.name, "epochs": _epochs(need.directory), "minutes": _minutes(ledger, need), **ppl})
    return out


def _record(plan: RowPlan, ours: dict[str, Any], ledger: dict[str, Any]) -> dict[str, Any]:
    row, run = plan.row, plan.run
    t = run.config.train
    rep = row.reported
    entry = ledger.get(run.name, {})
    earlier = _earlier_runs(run, ledger)
    return {
        "id": row.id, "row": row.row, "preset": row.preset, "run": run.name,
        "starts_from": [need.name for need in run.needs],
        "evaluation": row.evaluation, "stage": plan.stage, "spec": row.spec, "note": row.note,
        "paper": {"valid": rep.valid, "test": rep.test, "params": rep.params, "params_count": rep.params_count, **({"top10": list(rep.top10)} if rep.top10 else {})},
        "reglm": {**ours, "params_full_scale": plan.full_params},
        "budget": {
            "planned_epochs": {"main": t.epochs, "finetune": t.finetune_epochs if t.finetune else 0},
            "epochs": _epochs(run.directory),
            "minutes": _minutes(ledger, run),
            "minutes_with_earlier_runs": round(_minutes(ledger, run) + sum(item["minutes"] for item in earlier), 2),
            "earlier_runs": earlier,
            "status": entry.get("status"),
            "device": _device(run.directory),
        },
    }


# ---------------------------------------------------------------------- table.md / table.json


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _printed(value: float | None) -> str:
    """A paper's number as it prints it (60.0, 163.19)."""
    return "–" if value is None else f"{value:.1f}" if round(value, 1) == value else f"{value:.2f}"


def _cell(text: str) -> str:
    """``text`` safe in a Markdown table cell (``<unk>`` is no HTML tag)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _params(value: int | str | None) -> str:
    if value is None:
        return "–"
    return value if isinstance(value, str) else f"{value / 1e6:.2f}M"


def render_markdown(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """``table.md``: the settings, then one line per row, the paper's numbers beside reglm's."""
    paper, table = meta["table"].split(":")
    entry = PAPERS[paper].tables[table]
    budget = meta["budget"]
    lines = [
        f"# {PAPERS[paper].citation}: {'Table ' + table if table.isdigit() else table}",
        "",
        f"{entry.caption[0].upper()}{entry.caption[1:]}.",
        "",
        f"`{meta['command']}`: scale **{meta['scale']}**"
        + (f", at most {budget['epochs']} epoch(s) per stage" if budget["epochs"] else "")
        + (f", {budget['minutes']:g} minutes for the table" if budget["minutes"] else "")
        + f"; {meta['minutes']:.1f} minutes of training in all ({meta['runs']} run{'' if meta['runs'] == 1 else 's'}) on {', '.join(meta['devices']) or 'no device'}.",
        "",
    ]
    if entry.phrases:
        for record in records:
            lines += [f"## {record['row']} (`{record['preset']}`)", "", "| phrase | paper's top 10 | reglm's top 10 |", "|---|---|---|"]
            ours = record["reglm"].get("top10") or ["–"] * len(entry.phrases)
            for phrase, theirs, mine in zip(entry.phrases, record["paper"]["top10"], ours):
                lines.append(f"| {_cell(phrase)} | {_cell(theirs)} | {_cell(mine)} |")
            lines += ["", _budget_line(record), ""]
        return "\n".join(lines) + "\n"
    lines += [
        "| row | paper valid | paper test | reglm valid | reglm test | paper params | reglm params (full / trained) | evaluated | epochs (main+ft) | minutes | device |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    notes = []
    for record in records:
        ours, theirs, budget = record["reglm"], record["paper"], record["budget"]
        evaluated = f"{record['evaluation']}" + (f" {ours['setting']}" if ours.get("setting") else "") + (", main stage" if record["stage"] == "main" else "")
        epochs = f"{budget['epochs']['main']}+{budget['epochs']['finetune']}"
        lines.append(
            f"| {_cell(record['row'])} (`{record['id']}`) | {_printed(theirs['valid'])} | {_printed(theirs['test'])} | {_num(ours.get('valid'))} | {_num(ours.get('test'))} "
            f"| {theirs['params'] or '–'} | {_params(ours.get('params_full_scale'))} / {_params(ours.get('params'))} | {evaluated} | {epochs} "
            f"| {budget['minutes_with_earlier_runs']:.1f} | {budget['device'] or '–'} |"
        )
        for text in (ours.get("missing"), ours.get("note"), record["note"]):
            if text:
                notes.append(f"- `{record['id']}`: {_cell(text)}")
        if budget["earlier_runs"]:
            chain = "; ".join(
                f"`{item['run']}` ({item['epochs']['main']}+{item['epochs']['finetune']} epochs, {item['minutes']:.1f} min"
                + (f", valid {item['valid']:.2f} / test {item['test']:.2f}" if item["valid"] is not None and item["test"] is not None else "") + ")"
                for item in budget["earlier_runs"]
            )
            notes.append(f"- `{record['id']}`: run `{record['run']}` starts from {chain}; the minutes column counts them")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _budget_line(record: dict[str, Any]) -> str:
    budget = record["budget"]
    return f"Run `{record['run']}`: {budget['epochs']['main']}+{budget['epochs']['finetune']} epochs, {budget['minutes']:.1f} minutes on {budget['device'] or '–'}."


def _command(target: str, rows: list[str] | None, scale: str, budget: Budget, options: list[str]) -> str:
    """The ``reglm reproduce`` command line that makes (or resumes) this table."""
    flags = {"data.data_dir": "--data-dir", "train.device": "--device"}
    words = ["reglm reproduce", target, *(["--rows", ",".join(rows)] if rows else []), "--scale", scale]
    words += ["--budget", str(budget.epochs)] if budget.epochs else ["--minutes", f"{budget.minutes:g}"] if budget.minutes else []
    for option in options:
        key, _, value = option.partition("=")
        words += [flags[key], value] if key in flags else [option]
    return " ".join(words)


@dataclass(frozen=True)
class Reproduction:
    """What :func:`reproduce` did: ``table.json``'s content, ``table.md``'s, and where they are."""

    table: dict[str, Any]
    markdown: str
    directory: Path


def reproduce(
    target: str, out: Path, rows: list[str] | None = None, scale: str = "full", budget: Budget | None = None,
    options: list[str] | None = None, stop: Any = None, progress: bool = False,
) -> Reproduction:
    """Train (or resume) and score the rows of ``target`` (``PAPER:TABLE``) in ``out``, and write
    ``table.md`` and ``table.json`` there. ``options`` are ``key=value`` options for every base run
    (``data.data_dir=...``, ``train.device=...``); ``stop`` a :class:`~reglm.train.run.StopRequest`."""
    budget = budget or Budget()
    options = list(options or [])
    paper, table, _ = parse_target(target)
    selected = select_rows(paper, table, rows)
    out = Path(out).absolute()
    planner = Planner(out, scale, budget, options)
    plans = planner.plan(selected)
    manifest = _manifest(paper, table, scale, budget, options)
    ledger = claim_out(out, manifest)

    def save() -> None:
        _save_ledger(out, manifest, ledger)

    _say(f"{target}: {len(plans)} row(s), {len(planner.runs)} run(s) in {out / RUNS}")
    train_runs(planner.runs, budget, ledger, save, stop, progress)
    records = score_rows(out, plans, ledger, progress)
    meta = {
        **manifest,
        "command": _command(target, rows, scale, budget, options),
        "rows": [row.id for row in selected],
        "runs": len(planner.runs),
        "minutes": sum(ledger.get(run.name, {}).get("seconds", 0.0) for run in planner.runs) / 60,
        "devices": sorted({d for d in (_device(run.directory) for run in planner.runs) if d}),
    }
    markdown = render_markdown(meta, records)
    table_json = {**meta, "records": records}
    write_json(out / "table.json", table_json)
    write_text(out / "table.md", markdown)
    return Reproduction(table_json, markdown, out)
