"""``reglm data download|info|prepare``: fetch and verify a built-in corpus, describe a corpus and
its encoded-corpus cache entry, or build (and check) that entry ahead of a job;
``reglm presets``, ``reglm config`` and ``reglm params``: what can be trained, with which
options, and how many parameters it has."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from reglm.errors import ReglmError
from reglm.papers import PAPERS


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="download built-in corpora or describe a corpus")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("download", help="download and verify a built-in corpus")
    d.add_argument("name")
    d.add_argument("--data-dir")
    for command, text in (
        (
            "info",
            "token counts, vocabulary size, OOV rate and encoded-cache entry (path, size, dtype, age) of a corpus",
        ),
        (
            "prepare",
            "encode a corpus into the cache ahead of a job (download it first when needed), or re-hash an existing "
            "entry and rebuild it when damaged",
        ),
    ):
        d = dsub.add_parser(command, help=text)
        d.add_argument("name")
        d.add_argument("--data-dir")
        d.add_argument("--min-freq", type=int, default=1)
        d.add_argument("--max-vocab", type=int)
        d.add_argument(
            "--tokenizer",
            choices=["word", "bpe"],
            default="word",
            help="bpe: the sub-word corpus of --bpe-vocab-size units",
        )
        d.add_argument("--bpe-vocab-size", type=int, default=32000)
        d.add_argument("--synthetic-rule", default="stream", help="synthetic: stream or restart (`reglm config`)")
        d.add_argument("--synthetic-sentences", type=int, default=80000, help="synthetic: training sentences")
        d.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser(
        "presets",
        help="list the bundled presets and the paper/table each reproduces; with --paper: a paper's table rows and "
        "their numbers",
    )
    p.add_argument(
        "--paper", help=f"list this paper's tables and their rows ({', '.join(PAPERS)}), with the paper's numbers"
    )
    p.add_argument("--table", help="with --paper: only this table")
    p.add_argument("--json", action="store_true", help="with --paper: print one JSON object")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser(
        "config",
        help="list every configuration option with its default; with --preset or overrides: the resolved configuration",
    )
    p.add_argument("--preset", help="show this preset's resolved configuration (a bundled preset or a YAML file)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the resolved configuration as one JSON object (the defaults without --preset or overrides)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="options on top of the preset, as for `reglm train`"
    )
    p.set_defaults(func=cmd_config)
    p = sub.add_parser(
        "params", help="count a configuration's parameters (input layer, body, output layer) without allocating them"
    )
    p.add_argument("--preset", help="bundled preset name or YAML file")
    p.add_argument(
        "--vocab-size",
        type=int,
        metavar="V",
        help="vocabulary size (default: the corpus's, when it is a built-in or synthetic one or an existing directory)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="options on top of the preset, as for `reglm train`"
    )
    p.set_defaults(func=cmd_params)


def cmd_data(args: argparse.Namespace) -> int:
    from reglm.config import DataConfig
    from reglm.data import download, resolve

    if args.data_command == "download":
        path = download(args.name, args.data_dir)
        print(f"{args.name}: verified files in {path}")
        return 0
    options = DataConfig(
        name=args.name,
        data_dir=args.data_dir,
        min_freq=args.min_freq,
        max_vocab=args.max_vocab,
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.bpe_vocab_size,
        synthetic_rule=args.synthetic_rule,
        synthetic_sentences=args.synthetic_sentences,
    )

    def read() -> Any:
        return resolve(
            options.name,
            data_dir=options.data_dir,
            min_freq=options.min_freq,
            max_vocab=options.max_vocab,
            tokenizer=options.tokenizer,
            bpe_vocab_size=options.bpe_vocab_size,
            synthetic_rule=options.synthetic_rule,
            synthetic_sentences=options.synthetic_sentences,
        )

    corpus = read()
    if args.data_command == "prepare" and corpus.cache is not None:
        from reglm.data.cache import discard, verify

        damaged = verify(corpus.cache.path)
        if damaged:
            print(
                f"reglm: {', '.join(damaged)} in {corpus.cache.path} differ from its manifest (damaged); encoding "
                f"{args.name} again",
                file=sys.stderr,
            )
            discard(corpus.cache.path, args.name)
            corpus = read()
    return _report(corpus, args)


def _report(corpus: Any, args: argparse.Namespace) -> int:
    """Print a corpus's statistics and its cache entry (``prepare``: the entry and the vocabulary only)."""
    from reglm.config import DataConfig
    from reglm.data import SOURCES, corpus_stats, synthetic_stats
    from reglm.data.cache import describe
    from reglm.data.synthetic import PAPER_STATS, TrigramLanguage

    stats = (
        {"name": corpus.name, "vocab_size": len(corpus.vocab)}
        if args.data_command == "prepare"
        else corpus_stats(corpus)
    )
    if args.name in SOURCES:
        stats["sentences"] = SOURCES[args.name].sentences
    if args.data_command == "info" and corpus.truth is not None:
        language = TrigramLanguage(seed=DataConfig().synthetic_seed, rule=args.synthetic_rule)
        measured = synthetic_stats(corpus, language=language)
        stats["synthetic"] = {"rule": args.synthetic_rule, "measured": measured, "paper": PAPER_STATS}
    stats["cache"] = None if corpus.cache is None else describe(corpus.cache)
    if corpus.vocab.unk_id is not None:
        stats["unknown_types"] = corpus.vocab.unknown_types()
    if args.json:
        print(json.dumps(stats))
        return 0
    print(_table(stats))
    return 0


def _table(stats: dict[str, Any]) -> str:
    """``reglm data info`` / ``prepare`` as text: the corpus, its vocabulary, one row per split, the cache."""
    lines = [f"corpus      {stats['name']}"] + ([f"sentences   {stats['sentences']}"] if stats.get("sentences") else [])
    vocab = f"vocabulary  {stats['vocab_size']:,} {'units (BPE)' if stats.get('tokenizer') == 'bpe' else 'words'}"
    if "has_unk" in stats:
        vocab += f", <unk> for {stats['unknown_types']:,} unknown word types" if stats["has_unk"] else ", no <unk>"
    lines.append(vocab)
    if "tokens" in stats:
        words = "words" in stats
        lines.append(f"{'split':10s} {'tokens':>12s}" + (f" {'words':>12s}" if words else "") + f" {'<unk>':>8s}")
        for split, count in stats["tokens"].items():
            row = f"{split:10s} {count:>12,}" + (f" {stats['words'][split]:>12,}" if words else "")
            lines.append(row + f" {stats['unk_rate'][split]:>8.2%}")
    synthetic = stats.get("synthetic")
    if synthetic is not None:
        lines.append(f"{'synthetic (rule ' + synthetic['rule'] + ')':34s} {'measured':>10s} {'paper':>10s}")
        for name, measured in synthetic["measured"].items():
            paper = synthetic["paper"].get(name)
            lines.append(f"  {name:32s} {measured:>10.4g} {'-' if paper is None else format(paper, '.4g'):>10s}")
    cache = stats["cache"]
    if cache is None:
        lines.append("cache       none (read in memory)")
    else:
        lines.append(f"cache       {cache['path']}")
        lines.append(
            f"            {cache['bytes'] / 2**20:,.1f} MiB, ids {cache['dtype']}, "
            f"manifest {cache['manifest_hash'][:16]}, "
            f"built {cache['created']} ({cache['age_s'] / 3600:,.1f} h ago)"
        )
    return "\n".join(lines)


def cmd_presets(args: argparse.Namespace) -> int:
    """Every preset with its description; with ``--paper`` (``--table``), the rows of the paper's
    tables from the presets' ``paper:`` metadata, with the paper's numbers."""
    from reglm.config import list_presets

    if args.paper is None:
        if args.table is not None or args.json:
            raise ReglmError(
                "--table and --json list a paper's rows: give --paper NAME too (e.g. --paper inan --table 1)"
            )
        presets = list_presets()
        width = max(len(name) for name, _ in presets)
        for name, description in presets:
            print(f"{name:{width}s}  {description}")
        return 0
    tables = _paper_tables(args.paper, args.table)
    if args.json:
        print(json.dumps({"paper": args.paper, "tables": tables}))
        return 0
    for table in tables:
        note = f"  [not reproducible here: {table['missing']}]" if table["missing"] else ""
        if table["study"]:
            note = f"  [one chain of runs: `reglm study {table['study']}`, which `reglm reproduce` runs]"
        print(f"{args.paper}:{table['table']}  {table['caption']}{note}")
        if not table["rows"]:
            continue
        width = max(len(row["id"]) for row in table["rows"])
        preset_width = max(len(row["preset"]) for row in table["rows"])
        print(f"  {'id':{width}s}  {'preset':{preset_width}s}  {'valid':>7s}  {'test':>7s}  {'params':>6s}  evaluation")
        for row in table["rows"]:
            rep = row["reported"]
            how = (
                row["evaluation"]
                + (f" {row['spec']}" if row["spec"] else "")
                + (", main stage" if row["stage"] == "main" else "")
            )
            if "top10" in rep:
                how += f" (the top 10 after {len(rep['top10'])} phrases)"
            if row["starts_from"]:
                how += f", after {row['starts_from']['run']}"
            shown = [f"{rep[key]:7.2f}" if rep.get(key) is not None else f"{'-':>7s}" for key in ("valid", "test")]
            print(
                f"  {row['id']:{width}s}  {row['preset']:{preset_width}s}  {shown[0]}  {shown[1]}  "
                f"{rep.get('params') or '-':>6s}  {how}"
            )
    return 0


def _paper_tables(paper: str, table: str | None) -> list[dict[str, Any]]:
    """The tables of ``paper`` (or its ``table``) with their rows, as JSON-ready dicts."""
    import dataclasses

    from reglm.config.presets import preset_metadata, table_rows

    if paper not in PAPERS:
        raise ReglmError(f"unknown paper {paper!r}; choose one of {', '.join(PAPERS)}")
    tables = PAPERS[paper].tables
    if table is not None and table not in tables:
        raise ReglmError(f"{paper} has no table {table!r}; its tables are {', '.join(tables)}")
    out = []
    for name, entry in tables.items():
        if table is not None and name != table:
            continue
        rows = []
        for row in table_rows(paper, name):
            starts = preset_metadata(row.preset).starts_from
            record = {
                key: value
                for key, value in dataclasses.asdict(row).items()
                if key not in ("paper", "table", "reported")
            }
            reported = {key: value for key, value in dataclasses.asdict(row.reported).items() if value is not None}
            rows.append(
                {**record, "reported": reported, "starts_from": None if starts is None else dataclasses.asdict(starts)}
            )
        out.append(
            {"table": name, "caption": entry.caption, "missing": entry.missing, "study": entry.study, "rows": rows}
        )
    return out


def cmd_config(args: argparse.Namespace) -> int:
    """Every option with its type, default and help; with ``--preset``, overrides or ``--json``,
    the configuration they resolve to, as ``key=value`` lines or one JSON object."""
    from reglm.config import build_config, describe_options, describe_values

    if not (args.preset or args.overrides or args.json):
        print(describe_options())
        return 0
    config = build_config(args.preset, args.overrides)
    print(config.to_json() if args.json else describe_values(config))
    return 0


def _vocab_size(config: Any, given: int | None) -> tuple[int, str]:
    """The vocabulary size to count with, and where it comes from."""
    from reglm.data import SOURCES

    data = config.data
    if given is not None:
        if given < 2:
            raise ReglmError(f"--vocab-size {given} must be >= 2")
        return given, "--vocab-size"
    if data.tokenizer == "bpe":
        return data.bpe_vocab_size, "data.bpe_vocab_size"
    if data.name == "synthetic":
        from reglm.data.synthetic import SYNTHETIC_VOCAB_SIZE

        return SYNTHETIC_VOCAB_SIZE, "the synthetic corpus"
    if data.name in SOURCES:
        return SOURCES[data.name].vocab_size, f"the published {data.name} vocabulary"
    from reglm.data import resolve

    if Path(data.name).expanduser().is_dir():
        corpus = resolve(data.name, data_dir=data.data_dir, min_freq=data.min_freq, max_vocab=data.max_vocab)
        return len(corpus.vocab), f"the corpus {data.name}"
    raise ReglmError(
        f"corpus {data.name!r} is neither built in nor an existing directory; give --vocab-size V (billion word: "
        "793471)"
    )


def cmd_params(args: argparse.Namespace) -> int:
    from reglm.config import build_config
    from reglm.models import LanguageModel, shapes_only

    config = build_config(args.preset, args.overrides)
    vocab_size, source = _vocab_size(config, args.vocab_size)
    with shapes_only():
        split = LanguageModel(config.model, vocab_size).parameter_split()
    total = sum(split.values())
    if args.json:
        print(json.dumps({"preset": args.preset, "vocab_size": vocab_size, **split, "total": total}))
        return 0
    print(f"{args.preset or 'defaults'}: vocabulary {vocab_size:,} ({source})")
    for name, count in (*split.items(), ("total", total)):
        print(f"  {name:7s} {count:>15,}  {count / 1e6:9.1f}M")
    return 0
