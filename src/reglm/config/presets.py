"""Presets (YAML files of options), building a run's configuration, and reading it back.

A preset is a YAML mapping of sections (``data``, ``model``, ``train``, ``objective``) whose
keys are options, nested or dotted, of the component layout (:mod:`reglm.config.schema`), or
the old flat names; a key with ``*`` sets every matching option that exists
(``model: {"*dropout": 0}``). ``description`` names the paper, table and row; ``extends:
<preset>`` starts from another preset. :func:`build_config` applies the defaults, then the
preset chain, then ``key=value`` overrides, each as assignments in order.

Two blocks are metadata, not options, and belong to their file alone (a preset that extends
another does not inherit them); :func:`preset_metadata` reads and checks them:

``paper``
    the table row(s) the preset's run reproduces (:class:`TableRow`): one mapping, or a list when
    one run is a row of several tables. ``name`` and ``table`` name a table of
    :data:`reglm.papers.PAPERS`; ``id`` is the row's short name on the command line
    (``reglm reproduce inan:1 --rows ptb-small-al``); ``row`` the paper's label; ``reported`` the
    paper's numbers (``valid``, ``test`` perplexity, ``params`` as printed: ``24M`` or a count);
    ``evaluation`` how they were measured (``plain``, ``cache``, ``cache-search``, ``dynamic``,
    ``dynamic-search``, ``next-words``) with its ``spec`` (a ``reglm eval`` spec); ``stage`` which
    model (``final``: the best model at the end of the run, default; ``main``: the best model at the
    end of the main stage, before fine-tuning); ``note`` anything the reader must know.
``starts_from``
    a run that starts from another preset's trained model (:class:`StartsFrom`): ``run`` (that
    preset), ``objective`` (``lm``: cross-entropy from its weights, ``discriminator``,
    ``reverse-kl``) and, for ``reverse-kl``, ``discriminator`` (the preset of the discriminator
    run; omitted: r = 1/2). The file's options are then the training settings applied on top of the
    base run's configuration, as ``reglm finetune RUN --preset`` applies them.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from reglm.config.build import apply, build, kinds_first, nested_assignments
from reglm.config.fields import did_you_mean, fields_of
from reglm.config.kinds import family_configs
from reglm.config.parse import parse_assignments
from reglm.config.schema import RunConfig, architecture_differences
from reglm.errors import ReglmError
from reglm.evaluate.modes import MODES
from reglm.papers import PAPERS


def _preset_dir() -> Path:
    return Path(str(resources.files("reglm") / "presets"))


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader where PyYAML has it: listing the presets' metadata reads every file."""


def _load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_LOADER)


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every bundled preset, sorted by name."""
    out = []
    for path in sorted(_preset_dir().glob("*.yaml")):
        raw = _load_yaml(path) or {}
        out.append((path.stem, str(raw.get("description", ""))))
    return out


def load_preset(name: str, _chain: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """The assignments of a bundled preset (``name``) or of a YAML file (a path), its parents'
    (``extends``, recursively; a cycle is an error) first."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = _preset_dir() / f"{name}.yaml"
    if not path.is_file():
        known = [n for n, _ in list_presets()]
        hint = did_you_mean(name, known)
        if hint:
            raise ReglmError(
                f"unknown preset {name!r}{hint}; `reglm presets` lists them all, or give a path to a .yaml file"
            )
        raise ReglmError(f"unknown preset {name!r}; choose one of: {', '.join(known)} (or give a path to a .yaml file)")
    raw = _read_raw(path)
    for key in ("description", "source", *METADATA_KEYS):
        raw.pop(key, None)
    parent = raw.pop("extends", None)
    own = nested_assignments(raw)
    if parent is None:
        return own
    if not isinstance(parent, str):
        raise ReglmError(f"preset file {path}: extends must name one preset, got {parent!r}")
    if parent in _chain or parent == name:
        raise ReglmError(
            f"preset file {path}: extends {parent!r} forms a cycle ({' -> '.join((*_chain, name, parent))})"
        )
    return load_preset(parent, (*_chain, name)) + own


METADATA_KEYS = ("paper", "starts_from")
"""Top-level keys of a preset file that are metadata, not options (see the module docstring)."""
EVALUATIONS = (*MODES, "next-words")
"""How a row's numbers are measured: an evaluation mode (:data:`reglm.evaluate.modes.MODES`:
plain perplexity, or a ``reglm eval`` mode with ``spec``), or the top-k next words after phrases
(``lm.next_words``)."""
STAGES = ("final", "main")
_ROW_KEYS = ("name", "table", "id", "row", "reported", "evaluation", "spec", "stage", "note")
_REPORTED_KEYS = ("valid", "test", "params", "top10")
_ID = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_PARAMS = re.compile(r"^(\d+(?:\.\d+)?)([KMB])$")
_UNITS = {"K": 10**3, "M": 10**6, "B": 10**9}


@dataclass(frozen=True)
class Reported:
    """A row's numbers as the paper prints them (None where it prints none)."""

    valid: float | None = None
    test: float | None = None
    params: str | None = None
    """the parameter count as printed (``24M``, ``2.51B``) or a full count"""
    top10: tuple[str, ...] | None = None
    """next-words rows: per phrase, the printed top-10 words with their probabilities"""

    @property
    def params_count(self) -> int | None:
        """:attr:`params` as a number (``24M`` -> 24,000,000)."""
        if self.params is None:
            return None
        match = _PARAMS.match(self.params)
        return round(float(match.group(1)) * _UNITS[match.group(2)]) if match else int(self.params)

    @property
    def params_unit(self) -> int:
        """The precision :attr:`params` is printed to (``24M``: 10^6, ``2.51B``: 10^7, a full count: 1)."""
        match = _PARAMS.match(self.params or "")
        if not match:
            return 1
        decimals = len(match.group(1).partition(".")[2])
        return _UNITS[match.group(2)] // 10**decimals


@dataclass(frozen=True)
class TableRow:
    """One row of a paper's table, as a preset's ``paper:`` metadata states it."""

    preset: str
    paper: str
    table: str
    id: str
    row: str
    reported: Reported
    evaluation: str = "plain"
    spec: str | None = None
    stage: str = "final"
    note: str | None = None

    @property
    def key(self) -> str:
        return f"{self.paper}:{self.table}"


@dataclass(frozen=True)
class StartsFrom:
    """A run that starts from another preset's trained model (``starts_from:``)."""

    run: str
    objective: str
    discriminator: str | None = None


@dataclass(frozen=True)
class PresetMetadata:
    rows: tuple[TableRow, ...] = ()
    starts_from: StartsFrom | None = None


def _mapping(value: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReglmError(f"{where} must be a mapping with keys {', '.join(keys)}, got {value!r}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ReglmError(f"{where} has unknown key(s) {', '.join(map(str, unknown))}; the keys are {', '.join(keys)}")
    return value


def _text(value: Any, where: str, pattern: re.Pattern[str] | None = None, hint: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise ReglmError(f"{where} must be a non-empty text, got {value!r}")
    text = str(value).strip()
    if pattern is not None and not pattern.match(text):
        raise ReglmError(f"{where} {text!r} {hint}")
    return text


def _choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ReglmError(f"{where} {value!r} is unknown; choose one of {', '.join(choices)}")
    return value


def _perplexity(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
        raise ReglmError(f"{where} must be a perplexity (a number >= 1) or none, got {value!r}")
    return float(value)


def _reported(value: Any, where: str) -> Reported:
    raw = _mapping(value if value is not None else {}, where, _REPORTED_KEYS)
    params = raw.get("params")
    if params is not None:
        if isinstance(params, bool) or not (
            isinstance(params, int) and params > 0 or isinstance(params, str) and _PARAMS.match(params)
        ):
            raise ReglmError(
                f"{where}.params must be the count as printed, like 24M or 2.51B (or a whole number), got {params!r}"
            )
        params = str(params)
    top10 = raw.get("top10")
    if top10 is not None:
        if (
            not isinstance(top10, list)
            or not top10
            or not all(isinstance(item, str) and item.strip() for item in top10)
        ):
            raise ReglmError(f"{where}.top10 must list, per phrase, the printed words and probabilities as one text")
        top10 = tuple(item.strip() for item in top10)
    return Reported(
        _perplexity(raw.get("valid"), f"{where}.valid"), _perplexity(raw.get("test"), f"{where}.test"), params, top10
    )


def _table_row(preset: str, value: Any, where: str) -> TableRow:
    raw = _mapping(value, where, _ROW_KEYS)
    for key in ("name", "table", "id", "row"):
        if key not in raw:
            raise ReglmError(f"{where} has no {key!r}; a row names its paper (name), table, id and row label")
    paper = _choice(raw["name"], f"{where}.name", tuple(PAPERS))
    table = _text(raw["table"], f"{where}.table")
    if table not in PAPERS[paper].tables:
        raise ReglmError(
            f"{where}.table {table!r}: {paper} has no such table; its tables are {', '.join(PAPERS[paper].tables)}"
        )
    row = TableRow(
        preset=preset,
        paper=paper,
        table=table,
        id=_text(
            raw["id"],
            f"{where}.id",
            _ID,
            "must be lower-case letters, digits, dots and dashes (it is typed after --rows)",
        ),
        row=_text(raw["row"], f"{where}.row"),
        reported=_reported(raw.get("reported"), f"{where}.reported"),
        evaluation=_choice(raw.get("evaluation", "plain"), f"{where}.evaluation", EVALUATIONS),
        spec=None if raw.get("spec") is None else _text(raw["spec"], f"{where}.spec"),
        stage=_choice(raw.get("stage", "final"), f"{where}.stage", STAGES),
        note=None if raw.get("note") is None else _text(raw["note"], f"{where}.note"),
    )
    if row.spec is not None and row.evaluation in ("plain", "next-words"):
        raise ReglmError(
            f"{where}.spec is read by a cache or dynamic evaluation only, not by evaluation {row.evaluation}; drop it"
        )
    if row.evaluation != "plain" and row.stage == "main":
        raise ReglmError(
            f"{where}: stage main is read by plain evaluation only; evaluate the final model ({row.evaluation}) or "
            "make the row plain"
        )
    if (row.evaluation == "next-words") != (row.reported.top10 is not None):
        raise ReglmError(f"{where}: a next-words row states reported.top10 (and only such a row does)")
    return row


def _starts_from(value: Any, where: str) -> StartsFrom:
    raw = _mapping(value, where, ("run", "objective", "discriminator"))
    if "run" not in raw or "objective" not in raw:
        raise ReglmError(f"{where} names the base run's preset (run) and the objective")
    objectives = {kind: fields_of(config) for kind, config in family_configs("objective").items()}
    objective = _choice(raw["objective"], f"{where}.objective", tuple(objectives))
    discriminator = raw.get("discriminator")
    if discriminator is not None and "discriminator" not in objectives[objective]:
        readers = " or ".join(kind for kind, options in objectives.items() if "discriminator" in options)
        raise ReglmError(f"{where}.discriminator is read by objective {readers} only; drop it")
    return StartsFrom(
        _text(raw["run"], f"{where}.run"),
        objective,
        None if discriminator is None else _text(discriminator, f"{where}.discriminator"),
    )


def _read_raw(path: Path) -> dict[str, Any]:
    try:
        raw = _load_yaml(path) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ReglmError(f"preset file {path} is not valid YAML ({exc}); fix the file") from None
    if not isinstance(raw, dict):
        raise ReglmError(f"preset file {path} must hold a mapping of sections")
    return raw


@functools.cache
def preset_metadata(name: str) -> PresetMetadata:
    """The checked ``paper:`` and ``starts_from:`` blocks of the bundled preset ``name`` (read once per process)."""
    path = _preset_dir() / f"{name}.yaml"
    if not path.is_file():
        load_preset(name)  # the error for an unknown preset
    return metadata_of(name, _read_raw(path))


def metadata_of(name: str, raw: dict[str, Any]) -> PresetMetadata:
    """The checked metadata of the preset ``name`` whose file holds ``raw``; a malformed block is
    a ReglmError naming the preset and the key."""
    where = f"preset {name}"
    entries = raw.get("paper")
    entries = [] if entries is None else entries if isinstance(entries, list) else [entries]
    rows = tuple(
        _table_row(name, entry, f"{where}: paper" + (f"[{i}]" if len(entries) > 1 else ""))
        for i, entry in enumerate(entries)
    )
    starts = None if raw.get("starts_from") is None else _starts_from(raw["starts_from"], f"{where}: starts_from")
    if starts is not None:
        for other in (starts.run, starts.discriminator):
            if other is not None and not (_preset_dir() / f"{other}.yaml").is_file():
                raise ReglmError(f"{where}: starts_from names {other!r}, which is no bundled preset")
    return PresetMetadata(rows, starts)


def preset_parent(name: str) -> str | None:
    """The bundled preset that the bundled preset ``name`` extends, or None."""
    parent = _read_raw(_preset_dir() / f"{name}.yaml").get("extends")
    return parent if isinstance(parent, str) and (_preset_dir() / f"{parent}.yaml").is_file() else None


def table_rows(paper: str | None = None, table: str | None = None) -> list[TableRow]:
    """Every row the bundled presets state (of ``paper``, of its ``table``), in the papers' order
    (:attr:`reglm.papers.Table.rows`). A row id the table does not list, or one that two presets
    claim, is an error."""
    rows = [row for name, _ in list_presets() for row in preset_metadata(name).rows]
    seen: dict[tuple[str, str, str], str] = {}
    for row in rows:
        other = seen.setdefault((row.paper, row.table, row.id), row.preset)
        if other != row.preset:
            raise ReglmError(
                f"presets {other} and {row.preset} both claim row {row.id!r} of {row.key}; give one of them another id"
            )
        if row.id not in PAPERS[row.paper].tables[row.table].rows:
            raise ReglmError(
                f"preset {row.preset}: row {row.id!r} is not a row of {row.key}; add it to the table's rows in "
                "reglm/papers.py, in the paper's order"
            )
    papers = list(PAPERS)

    def order(row: TableRow) -> tuple[int, int, int]:
        tables = PAPERS[row.paper].tables
        return papers.index(row.paper), list(tables).index(row.table), tables[row.table].rows.index(row.id)

    return sorted(
        (row for row in rows if (paper is None or row.paper == paper) and (table is None or row.table == table)),
        key=order,
    )


def _apply_preset(raw: dict[str, Any], preset: str) -> None:
    """The preset's assignments on ``raw``; an option it does not know is blamed on the preset."""
    assignments = load_preset(preset)
    try:
        apply(raw, RunConfig, assignments)
    except ReglmError as exc:
        raise ReglmError(f"preset {preset}: {exc}") from None


def _apply_overrides(raw: dict[str, Any], overrides: list[str], sources: dict[str, str]) -> None:
    """``key=value`` overrides on ``raw``, kinds first; ``sources`` learns which override set
    which option, so a bad value names the override as written, not the preset under it."""
    items = [
        (key, value, f"override {text.strip()}") for (key, value), text in zip(parse_assignments(overrides), overrides)
    ]
    apply(raw, RunConfig, kinds_first(items, RunConfig), sources=sources)


def build_config(
    preset: str | None = None, overrides: list[str] | None = None, assignments: Iterable[tuple[str, Any]] = ()
) -> RunConfig:
    """Defaults, then the preset, then ``key=value`` overrides, then ``assignments``, options a program
    sets as ``(key, value)`` pairs of typed values (nothing formatted to text and parsed back); validated."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if preset:
        _apply_preset(raw, preset)
        raw["preset"] = preset
    if overrides:
        _apply_overrides(raw, overrides, sources)
    apply(raw, RunConfig, assignments, sources=sources)
    return build(RunConfig, raw, f"preset {preset}" if preset else "options", sources=sources)


CONFIG_BYTES = 4 << 20
"""The largest run ``config.json`` read (reglm's are a few kilobytes)."""


def load_config_file(path: Path) -> RunConfig:
    from reglm.io import read_json

    try:
        raw = read_json(path, "the run directory is damaged", max_bytes=CONFIG_BYTES)
    except FileNotFoundError:
        raise ReglmError(f"{path} is missing; is this a reglm run directory?") from None
    if not isinstance(raw, dict):
        raise ReglmError(f"{path} is not a reglm configuration; the run directory is damaged")
    return RunConfig.from_dict(raw, source=str(path))


def derive_config(
    base: RunConfig,
    preset: str | None,
    overrides: list[str],
    objective: dict[str, Any],
    what: str,
    assignments: Iterable[tuple[str, Any]] = (),
) -> RunConfig:
    """The configuration of a run that continues from a trained model (a discriminator, a
    fine-tuning): ``base``'s, then the preset's and the overrides' training options and
    ``assignments``, then ``objective``. The architecture and the data must stay the base model's."""
    raw = base.to_dict()
    raw["preset"] = preset
    sources: dict[str, str] = {}
    if preset:
        _apply_preset(raw, preset)
    _apply_overrides(raw, overrides, sources)
    apply(raw, RunConfig, assignments, sources=sources)
    raw["objective"] = objective
    config = build(RunConfig, raw, f"preset {preset}" if preset else "options", sources=sources)
    diff = architecture_differences(base.model, config.model)
    if diff:
        raise ReglmError(
            f"{what} keeps the architecture of the model it starts from, but the options change {'; '.join(diff)}; "
            "drop those overrides"
        )
    if config.data != base.data:
        raise ReglmError(f"{what} reads the data the model was trained on; drop the data.* overrides")
    return config
