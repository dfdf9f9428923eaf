"""``reglm data download|info``: fetch and verify a built-in corpus, or describe a corpus;
``reglm presets``, ``reglm config`` and ``reglm params``: what can be trained, with which
options, and how many parameters it has."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from reglm.errors import ReglmError


def register(sub: Any) -> None:
    p = sub.add_parser("data", help="download built-in corpora or describe a corpus")
    dsub = p.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("download", help="download and verify a built-in corpus")
    d.add_argument("name")
    d.add_argument("--data-dir")
    d = dsub.add_parser("info", help="token counts, vocabulary size and OOV rate of a corpus")
    d.add_argument("name")
    d.add_argument("--data-dir")
    d.add_argument("--min-freq", type=int, default=1)
    d.add_argument("--max-vocab", type=int)
    d.add_argument("--tokenizer", choices=["word", "bpe"], default="word", help="bpe: describe the sub-word corpus of --bpe-vocab-size units")
    d.add_argument("--bpe-vocab-size", type=int, default=32000)
    d.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data)
    sub.add_parser("presets", help="list the bundled presets and the paper/table each reproduces").set_defaults(func=cmd_presets)
    p = sub.add_parser("config", help="list every configuration option with its default; with --preset or overrides: the resolved configuration")
    p.add_argument("--preset", help="show this preset's resolved configuration (a bundled preset or a YAML file)")
    p.add_argument("--json", action="store_true", help="print the resolved configuration as one JSON object (the defaults without --preset or overrides)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="options on top of the preset, as for `reglm train`")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("params", help="count a configuration's parameters (input layer, body, output layer) without allocating them")
    p.add_argument("--preset", help="bundled preset name or YAML file")
    p.add_argument("--vocab-size", type=int, metavar="V", help="vocabulary size (default: the corpus's, when it is a built-in or synthetic one or an existing directory)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="options on top of the preset, as for `reglm train`")
    p.set_defaults(func=cmd_params)


def cmd_data(args: argparse.Namespace) -> int:
    from reglm.config import DataConfig
    from reglm.data import corpus_stats, download, resolve

    if args.data_command == "download":
        path = download(args.name, args.data_dir)
        print(f"{args.name}: verified files in {path}")
        return 0
    options = DataConfig(name=args.name, data_dir=args.data_dir, min_freq=args.min_freq, max_vocab=args.max_vocab, tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab_size)
    corpus = resolve(
        options.name, data_dir=options.data_dir, min_freq=options.min_freq, max_vocab=options.max_vocab,
        tokenizer=options.tokenizer, bpe_vocab_size=options.bpe_vocab_size,
    )
    stats = corpus_stats(corpus)
    if args.json:
        print(json.dumps(stats))
    else:
        for key, value in stats.items():
            print(f"{key:24s} {value}")
    return 0


def cmd_presets(_args: argparse.Namespace) -> int:
    from reglm.config import list_presets

    for name, description in list_presets():
        print(f"{name:22s} {description}")
    return 0


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
        return SYNTHETIC_VOCAB_SIZE, "the synthetic corpus"
    if data.name in SOURCES:
        return SOURCES[data.name].vocab_size, f"the published {data.name} vocabulary"
    from reglm.data import resolve

    if Path(data.name).expanduser().is_dir():
        corpus = resolve(data.name, data_dir=data.data_dir, min_freq=data.min_freq, max_vocab=data.max_vocab)
        return len(corpus.vocab), f"the corpus {data.name}"
    raise ReglmError(f"corpus {data.name!r} is neither built in nor an existing directory; give --vocab-size V (billion word: 793471)")


SYNTHETIC_VOCAB_SIZE = 1001
"""the synthetic trigram corpus: 1000 words and ``<eos>``"""


def cmd_params(args: argparse.Namespace) -> int:
    from reglm.config import build_config
    from reglm.models import LanguageModel

    config = build_config(args.preset, args.overrides)
    vocab_size, source = _vocab_size(config, args.vocab_size)
    import torch

    with torch.device("meta"):
        split = LanguageModel(config.model, vocab_size).parameter_split()
    total = sum(split.values())
    if args.json:
        print(json.dumps({"preset": args.preset, "vocab_size": vocab_size, **split, "total": total}))
        return 0
    print(f"{args.preset or 'defaults'}: vocabulary {vocab_size:,} ({source})")
    for name, count in (*split.items(), ("total", total)):
        print(f"  {name:7s} {count:>15,}  {count / 1e6:9.1f}M")
    return 0
