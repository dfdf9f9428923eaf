"""``reglm generate``: sample text from a trained run, streamed word by word."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("generate", help="sample text from a trained run, printed word by word as it is sampled")
    p.add_argument("run")
    p.add_argument(
        "--words", type=int, default=50, help="how many tokens to sample (no upper bound: the output streams)"
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="> 0; tiny values sample the most likely word (greedy)"
    )
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely words only")
    p.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        help="sample among the most likely words whose probabilities sum to P (nucleus sampling)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="", help="words to condition on (each must be in the vocabulary)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from reglm.api import load
    from reglm.data.vocab import EOS

    lm = load(args.run, args.checkpoint)
    tokens = lm.stream(args.words, args.temperature, args.seed, args.prompt, args.top_k, args.top_p)
    line_start = True
    for token in tokens:
        if token == EOS:
            sys.stdout.write("\n")
            line_start = True
        else:
            sys.stdout.write(token if line_start else " " + token)
            line_start = False
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
