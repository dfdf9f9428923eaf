"""``reglm data download|info``: fetch and verify a built-in corpus, or describe a corpus;
``reglm presets`` and ``reglm config``: what can be trained and with which options."""

from __future__ import annotations

import argparse
import json
from typing import Any


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
    d.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data)
    sub.add_parser("presets", help="list the bundled presets and the paper/table each reproduces").set_defaults(func=cmd_presets)
    sub.add_parser("config", help="list every configuration option with its default").set_defaults(func=cmd_config)


def cmd_data(args: argparse.Namespace) -> int:
    from reglm.config import DataConfig
    from reglm.data import corpus_stats, download, resolve

    if args.data_command == "download":
        path = download(args.name, args.data_dir)
        print(f"{args.name}: verified files in {path}")
        return 0
    options = DataConfig(name=args.name, data_dir=args.data_dir, min_freq=args.min_freq, max_vocab=args.max_vocab)
    corpus = resolve(options.name, data_dir=options.data_dir, min_freq=options.min_freq, max_vocab=options.max_vocab)
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


def cmd_config(_args: argparse.Namespace) -> int:
    from reglm.config import describe_options

    print(describe_options())
    return 0
