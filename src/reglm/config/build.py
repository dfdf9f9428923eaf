"""The one builder of configurations: raw mappings and ``key=value`` assignments to dataclasses.

A configuration is a tree of frozen dataclasses (:mod:`reglm.config.schema`). Three kinds of node:

* a **section**: a dataclass field whose type is a dataclass (``data``, ``model``, ``train``);
* a **component**: a field with ``metadata["family"]`` (``model.encoder``, ``model.output``,
  ``train.optimizer``...): its dataclass is chosen by the ``kind`` of the raw mapping among the
  configs of that family's registry (:data:`~reglm.config.kinds.FAMILIES`); a plain string sets
  the kind (``model.encoder=vd-lstm``). A dataclass with a ``kind`` field (``model.output.advsoft``)
  takes the same shorthand;
* a **leaf**: a typed scalar, checked against its annotation.

Every source -- a preset file, ``key=value`` overrides, a saved ``config.json`` -- becomes a list
of *assignments* ``(path, value)`` applied in order to one raw nested mapping
(:func:`assign`). Changing a component's kind drops the settings the new kind does not have, so
``model.encoder=vd-lstm`` on top of an AWD-LSTM preset keeps ``hidden_size`` and ``num_layers``.
A path with ``*`` (``model.*dropout=0``) sets every matching option that exists. Old flat names
(``model.emb_size``, ``train.lr``; the layout before components) are aliases of their new paths
(:data:`~reglm.config.aliases.ALIASES`), so old commands, presets and run directories keep working.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Iterator
from typing import Any

from reglm.config.aliases import ALIASES, LENIENT_ALIASES, OLD_AVERAGING
from reglm.config.fields import closest, coerce, did_you_mean, fields_of, hints_of, suggestion
from reglm.config.kinds import component_class, family_configs, kinds_help
from reglm.errors import ReglmError

Path = tuple[str, ...]


def component(family: str, default_kind: str, what: str) -> Any:
    """A dataclass field holding a component of ``family`` (its default kind's default config):
    ``what`` it is; ``reglm config`` lists its kinds from the registry
    (:func:`~reglm.config.kinds.kinds_help`), so no help text names them."""
    return dataclasses.field(
        default_factory=lambda: family_configs(family)[default_kind](), metadata={"help": what, "family": family}
    )


def _default_kind(f: dataclasses.Field) -> str:
    return _default(f).kind


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING
    return f.default_factory()


def _is_kinded(cls: type) -> bool:
    return dataclasses.is_dataclass(cls) and "kind" in fields_of(cls)


def _node_class(f: dataclasses.Field, hint: Any, raw: Any) -> type | None:
    """The dataclass a field's raw value builds (None for a leaf)."""
    family = f.metadata.get("family")
    if family is not None:
        kind = raw.get("kind") if isinstance(raw, dict) else None
        kind = kind if kind is not None else _default_kind(f)
        configs = family_configs(family)
        if kind not in configs:
            return None
        return configs[kind]
    return hint if dataclasses.is_dataclass(hint) else None


def _option_name(path: Path) -> str:
    return ".".join(path)


def _kind_error(family: str, kind: Any, path: Path) -> ReglmError:
    configs = family_configs(family)
    hint = ""
    if path[-1] == "optimizer" and kind in OLD_AVERAGING:
        hint = f"; the averaging policy is now train.averaging={OLD_AVERAGING[kind]}"
    return ReglmError(
        f"invalid option {_option_name(path)}: unknown {family} {kind!r}{did_you_mean(kind, configs)}; "
        f"choose one of {kinds_help(family)}{hint}"
    )


def assign(
    raw: dict[str, Any], root: type, path: Path, value: Any, lenient: bool = False, prefix: Path = ()
) -> list[Path]:
    """Set ``path`` to ``value`` in the raw mapping of ``root`` (in place), schema-aware: a
    component's kind is resolved as the walk goes, and setting a kind drops the settings the new
    kind lacks. Returns the full paths of the options set. An unknown path is a ReglmError naming
    the options there; with ``lenient`` it is skipped instead (migration of old files,
    multi-target aliases)."""
    name, rest = path[0], path[1:]
    fields = fields_of(root)
    if name not in fields:
        if lenient:
            return []
        chosen = raw.get("kind", fields["kind"].default) if "kind" in fields else None
        kind = f" (kind {chosen!r} has no such option)" if chosen else ""
        raise ReglmError(
            f"unknown option {_option_name((*prefix, *path))}{kind}; the options here are: "
            f"{', '.join(sorted(fields))} (`reglm config` lists them all)"
        )
    f = fields[name]
    hint = hints_of(root)[name]
    family = f.metadata.get("family")
    child_cls = hint if dataclasses.is_dataclass(hint) else None
    if family is None and child_cls is None:
        if rest:
            raise ReglmError(f"unknown option {_option_name((*prefix, *path))}: {name} is not a section")
        raw[name] = _kind_name(value) if name == "kind" else value
        return [(*prefix, name)]
    current = raw.get(name)
    current = dict(current) if isinstance(current, dict) else {}
    raw[name] = current
    kinded = family is not None or _is_kinded(child_cls)
    if not rest:
        if kinded and (isinstance(value, str) or value is None):
            value = {"kind": "none" if value is None else value}
        if not isinstance(value, dict):
            raise ReglmError(
                f"invalid option {_option_name((*prefix, name))}: expected {'a kind or ' if kinded else ''}a "
                f"mapping of options, got {value!r}"
            )
        return [
            p
            for key, sub in _flatten(value)
            for p in _assign_inside(current, f, child_cls, key, sub, lenient, (*prefix, name))
        ]
    return _assign_inside(current, f, child_cls, rest, value, lenient, (*prefix, name))


def _assign_inside(
    current: dict[str, Any],
    f: dataclasses.Field,
    child_cls: type | None,
    key: Path,
    value: Any,
    lenient: bool,
    where: Path,
) -> list[Path]:
    """One assignment inside a section's or component's mapping; a new kind first drops the
    settings it lacks."""
    family = f.metadata.get("family")
    if family is None:
        assert child_cls is not None
        return assign(current, child_cls, key, value, lenient, where)
    configs = family_configs(family)
    if key == ("kind",):
        value = _kind_name(value)
        if value not in configs:
            raise _kind_error(family, value, where)
        keep = fields_of(configs[value])
        for name in list(current):
            if name not in keep:
                del current[name]
        current["kind"] = value
        return [(*where, "kind")]
    kind = current.get("kind", _default_kind(f))
    if kind not in configs:
        raise _kind_error(family, kind, where)
    return assign(current, configs[kind], key, value, lenient, where)


def _kind_name(value: Any) -> Any:
    """A kind as written: ``kind=none`` reads as the value None, which names the kind ``none``."""
    return "none" if value is None else value


def _flatten(mapping: dict[str, Any], prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    """``(path, value)`` of a nested mapping, ``kind`` first at every level; a nested mapping is
    descended, except under a key that is a single dotted option name."""
    items = sorted(mapping.items(), key=lambda kv: kv[0] != "kind")
    for key, value in items:
        path = (*prefix, *str(key).split("."))
        if isinstance(value, dict) and value:
            yield from _flatten(value, path)
        else:
            yield path, value


def apply(
    raw: dict[str, Any],
    root: type,
    assignments: Iterable[tuple[Any, ...]],
    lenient: bool = False,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Apply ``(key, value)`` assignments in order: a key is a full path, an alias, a unique
    option name, or a ``*`` pattern over the options that exist.

    An assignment may carry a third item, its origin (``"override lr=abc"``): ``sources`` then
    maps every option it sets to that origin (with the option's full path when the key was
    shorter), so that :func:`build` blames a bad value on what the user wrote; an assignment
    without one clears the options it sets from ``sources``."""
    for key, value, *origin in assignments:
        if "*" in key or "?" in key:
            matches = [p for p in leaf_paths(raw, root) if fnmatch.fnmatchcase(_option_name(p), key)]
            if not matches and not lenient:
                raise ReglmError(f"the pattern {key!r} matches no option; `reglm config` lists them")
            done = [p for path in matches for p in assign(raw, root, path, value, lenient)]
        else:
            targets = resolve_key(key, root)
            loose = lenient or len(targets) > 1 or bool({key, f"train.{key}"} & LENIENT_ALIASES)
            done = [p for path in targets for p in assign(raw, root, path, value, loose)]
        if sources is not None:
            for path in map(_option_name, done):
                if origin:
                    sources[path] = origin[0] if path == key else f"{origin[0]} (option {path})"
                else:
                    sources.pop(path, None)
    return raw


def kinds_first(assignments: Iterable[tuple[Any, ...]], root: type) -> list[tuple[Any, ...]]:
    """``assignments`` with those that choose a component's kind first (stable otherwise), so
    that one layer of options may name a kind after the options it brings
    (``model.n_experts=5 model.output=mos``)."""

    def chooses_kind(item: tuple[Any, ...]) -> bool:
        key, value = item[0], item[1]
        if "*" in key or "?" in key:
            return False
        paths = resolve_key(key, root)
        return any(path[-1] == "kind" or (isinstance(value, str) and _is_component_path(path, root)) for path in paths)

    items = list(assignments)
    return sorted(items, key=lambda item: not chooses_kind(item))


def _is_component_path(path: Path, root: type) -> bool:
    cls: Any = root
    for depth, name in enumerate(path):
        fields = fields_of(cls) if dataclasses.is_dataclass(cls) else {}
        if name not in fields:
            return False
        f, hint = fields[name], hints_of(cls)[name]
        last = depth == len(path) - 1
        if f.metadata.get("family") is not None:
            if last:
                return True
            cls = next(iter(family_configs(f.metadata["family"]).values()))
        elif dataclasses.is_dataclass(hint):
            if last:
                return _is_kinded(hint)
            cls = hint
        else:
            return False
    return False


def nested_assignments(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested mapping (a preset file, a saved config) as ``(dotted key, value)`` assignments."""
    return [(".".join(path), value) for path, value in _flatten(mapping, tuple(prefix.split(".")) if prefix else ())]


def leaf_paths(raw: dict[str, Any], root: type, prefix: Path = ()) -> list[Path]:
    """Every leaf option of ``root`` with the kinds ``raw`` chooses."""
    out: list[Path] = []
    hints = hints_of(root)
    for name, f in fields_of(root).items():
        sub = raw.get(name) if isinstance(raw, dict) else None
        cls = _node_class(f, hints[name], sub)
        if cls is None:
            if name != "kind":
                out.append((*prefix, name))
            continue
        out.extend(leaf_paths(sub if isinstance(sub, dict) else {}, cls, (*prefix, name)))
    return out


def all_paths(root: type, prefix: Path = ()) -> Iterator[tuple[Path, dataclasses.Field, Any, list[str], str]]:
    """Every option of every kind: ``(path, field, annotation, kinds that have it, help)``. The
    help of a component field or of a kinded dataclass is printed on its ``kind`` line, before
    the kinds: a component's registered kinds (:func:`kinds_help`), a dataclass's own."""
    hints = hints_of(root)
    for name, f in fields_of(root).items():
        family = f.metadata.get("family")
        hint = hints[name]
        if family is not None:
            merged: dict[Path, tuple[dataclasses.Field, Any, list[str], str]] = {}
            for kind, cls in family_configs(family).items():
                for path, sub_f, sub_hint, _, text in all_paths(cls, (*prefix, name)):
                    if path == (*prefix, name, "kind"):
                        text = f"{f.metadata['help']}: {kinds_help(family, described=True)}"
                    entry = merged.setdefault(path, (sub_f, sub_hint, [], text))
                    if kind not in entry[2]:
                        entry[2].append(kind)
            for path, (sub_f, sub_hint, kinds, text) in merged.items():
                yield path, sub_f, sub_hint, kinds, text
        elif dataclasses.is_dataclass(hint):
            for path, sub_f, sub_hint, kinds, text in all_paths(hint, (*prefix, name)):
                if path == (*prefix, name, "kind") and "help" in f.metadata:
                    text = f"{f.metadata['help']}: {text}"
                yield path, sub_f, sub_hint, kinds, text
        else:
            yield (*prefix, name), f, hint, [], f.metadata.get("help", "")


def resolve_key(key: str, root: type) -> list[Path]:
    """The path(s) a ``key=value`` key names: ``section.field...``, an old flat alias, or a
    unique option name (``lr``, ``hidden_size``). Ambiguous or unknown keys are ReglmErrors."""
    key = key.strip().replace("-", "_")
    if key in ALIASES:
        return [tuple(p.split(".")) for p in ALIASES[key]]
    known = {path for path, *_ in all_paths(root)}
    sections = {path[: i + 1] for path in known for i in range(len(path) - 1)}
    path = tuple(key.split("."))
    if path in known or path in sections:
        return [path]
    if "." in key:
        raise ReglmError(
            f"unknown override key {key!r}{_suggest_key(path, known | sections)}; `reglm config` lists the keys"
        )
    owners = sorted({p for p in known | sections if p[-1] == key})
    owners += [
        tuple(targets[0].split("."))
        for alias, targets in ALIASES.items()
        if alias.split(".")[-1] == key and len(targets) == 1 and tuple(targets[0].split(".")) not in owners
    ]
    if not owners:
        raise ReglmError(
            f"unknown override key {key!r}{_suggest_key(path, known | sections)}; `reglm config` lists the keys"
        )
    if len(owners) > 1:
        flat = _flat_meaning(key, known)
        if flat is not None:
            return [flat]
        raise ReglmError(
            f"override key {key!r} is ambiguous; write one of {', '.join(_option_name(o) for o in owners)}"
        )
    return [owners[0]]


def _flat_meaning(key: str, known: set[Path]) -> Path | None:
    """What a bare name shared by several options named in the flat layout, when that is one
    option: the target of an old flat alias (``lr``: ``train.optimizer.lr``, not
    ``train.finetune.lr``), or an option directly in a section (``epochs``: ``train.epochs``)."""
    flat = {
        tuple(targets[0].split("."))
        for alias, targets in ALIASES.items()
        if alias.count(".") == 1 and alias.split(".")[1] == key and len(targets) == 1
    }
    flat |= {path for path in known if len(path) == 2 and path[1] == key}
    return flat.pop() if len(flat) == 1 else None


def _suggest_key(path: Path, known: set[Path]) -> str:
    """Did-you-mean for a key no option has: the option of the same section whose name is
    closest to its last part (``train.lrr`` -> ``train.lr``, an old name), else the full name
    closest to it (``modle.encoder.hidden_size``); for a bare name (``lrr``), the options of the
    closest name."""
    names = known | {tuple(alias.split(".")) for alias in ALIASES}
    if len(path) == 1:
        best = closest(path[0], {p[-1] for p in names})
        flat = _flat_meaning(best, known) if best else None
        owners = [_option_name(flat)] if flat else sorted(_option_name(p) for p in known if p[-1] == best)
        if len(owners) == 1 and owners[0] != best:
            return suggestion(f"{best}, i.e. {owners[0]}")
        return suggestion(*owners) if 1 < len(owners) <= 3 else suggestion(best)
    siblings = {p[-1] for p in names if p[:-1] == path[:-1]}
    if siblings:
        best = closest(path[-1], siblings)
        return suggestion(best and _option_name((*path[:-1], best)))
    return did_you_mean(_option_name(path), map(_option_name, names))


# ------------------------------------------------------------------ building


def build(cls: type, raw: Any, where: str, prefix: str = "", sources: dict[str, str] | None = None) -> Any:
    """The dataclass ``cls`` from its raw mapping (defaults for what is missing), validated. A
    value that is not of its option's type is blamed on ``where`` (a preset, a file), or on the
    assignment that set it when ``sources`` (from :func:`apply`) names one."""
    if not isinstance(raw, dict):
        raise ReglmError(f"{where}: {prefix.rstrip('.') or 'the configuration'}: expected a mapping, got {raw!r}")
    hints = hints_of(cls)
    fields = fields_of(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        hint = did_you_mean(unknown[0], fields) if len(unknown) == 1 else ""
        raise ReglmError(
            f"{where}: unknown option(s) {', '.join(prefix + u for u in unknown)}{hint}; `reglm config` lists the "
            "options"
        )
    sources = sources or {}
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        hint, value = hints[name], raw[name]
        family = f.metadata.get("family")
        if family is not None:
            value = value if isinstance(value, dict) else {"kind": value}
            kind = value.get("kind", _default_kind(f))
            configs = family_configs(family)
            if kind not in configs:
                raise _kind_error(family, kind, tuple(f"{prefix}{name}".split(".")))
            kwargs[name] = build(configs[kind], value, where, f"{prefix}{name}.", sources)
            component_class(family, kwargs[name], f"{prefix}{name}")
        elif dataclasses.is_dataclass(hint):
            if _is_kinded(hint) and not isinstance(value, dict):
                value = {"kind": "none" if value is None else value}
            kwargs[name] = build(hint, value, where, f"{prefix}{name}.", sources)
        else:
            kwargs[name] = coerce(value, hint, sources.get(f"{prefix}{name}", f"{where}: {prefix}{name}"))
    return cls(**kwargs)
