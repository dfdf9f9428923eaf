"""Presets (YAML files of options), building a run's configuration, and reading it back.

A preset is a YAML mapping of sections (``data``, ``model``, ``train``, ``objective``) whose
keys are options, nested or dotted, of the component layout (:mod:`reglm.config.schema`), or
the old flat names; a key with ``*`` sets every matching option that exists
(``model: {"*dropout": 0}``). ``description`` names the paper, table and row; ``extends:
<preset>`` starts from another preset. :func:`build_config` applies the defaults, then the
preset chain, then ``key=value`` overrides, each as assignments in order.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from reglm.config.build import apply, build, did_you_mean, kinds_first, nested_assignments
from reglm.config.parse import parse_assignments
from reglm.config.schema import RunConfig, architecture_differences
from reglm.errors import ReglmError


def _preset_dir() -> Path:
    return Path(str(resources.files("reglm") / "presets"))


def list_presets() -> list[tuple[str, str]]:
    """(name, description) of every bundled preset, sorted by name."""
    out = []
    for path in sorted(_preset_dir().glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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
            raise ReglmError(f"unknown preset {name!r}{hint}; `reglm presets` lists them all, or give a path to a .yaml file")
        raise ReglmError(f"unknown preset {name!r}; choose one of: {', '.join(known)} (or give a path to a .yaml file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ReglmError(f"preset file {path} is not valid YAML ({exc}); fix the file") from None
    if not isinstance(raw, dict):
        raise ReglmError(f"preset file {path} must hold a mapping of sections")
    raw.pop("description", None)
    raw.pop("source", None)
    parent = raw.pop("extends", None)
    own = nested_assignments(raw)
    if parent is None:
        return own
    if not isinstance(parent, str):
        raise ReglmError(f"preset file {path}: extends must name one preset, got {parent!r}")
    if parent in _chain or parent == name:
        raise ReglmError(f"preset file {path}: extends {parent!r} forms a cycle ({' -> '.join((*_chain, name, parent))})")
    return load_preset(parent, (*_chain, name)) + own


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
    items = [(key, value, f"override {text.strip()}") for (key, value), text in zip(parse_assignments(overrides), overrides)]
    apply(raw, RunConfig, kinds_first(items, RunConfig), sources=sources)


def build_config(preset: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the preset, then ``key=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if preset:
        _apply_preset(raw, preset)
        raw["preset"] = preset
    if overrides:
        _apply_overrides(raw, overrides, sources)
    return build(RunConfig, raw, f"preset {preset}" if preset else "options", sources=sources)


def load_config_file(path: Path) -> RunConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReglmError(f"{path} is missing; is this a reglm run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReglmError(f"{path} is not valid JSON ({exc}); the run directory is damaged") from None
    if not isinstance(raw, dict):
        raise ReglmError(f"{path} is not a reglm configuration; the run directory is damaged")
    return RunConfig.from_dict(raw, source=str(path))


def derive_config(base: RunConfig, preset: str | None, overrides: list[str], objective: dict[str, Any], what: str) -> RunConfig:
    """The configuration of a run that continues from a trained model (a discriminator, a
    fine-tuning): ``base``'s, then the preset's and the overrides' training options, then
    ``objective``. The architecture and the data must stay the base model's."""
    raw = base.to_dict()
    raw["preset"] = preset
    sources: dict[str, str] = {}
    if preset:
        _apply_preset(raw, preset)
    _apply_overrides(raw, overrides, sources)
    raw["objective"] = objective
    config = build(RunConfig, raw, f"preset {preset}" if preset else "options", sources=sources)
    diff = architecture_differences(base.model, config.model)
    if diff:
        raise ReglmError(f"{what} keeps the architecture of the model it starts from, but the options change {'; '.join(diff)}; drop those overrides")
    if config.data != base.data:
        raise ReglmError(f"{what} reads the data the model was trained on; drop the data.* overrides")
    return config
