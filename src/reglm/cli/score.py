"""``reglm score``: score a file sentence by sentence (n-best rescoring, KenLM's ``query``).

One sentence (or hypothesis) per line, each scored from a fresh state after ``<eos>`` (``--carry``
reads the lines as one text instead), its ``<eos>`` scored unless ``--no-eos``. A line
``ID<TAB>sentence`` (an n-best list) echoes its id; otherwise a line is identified by its 1-based
number. An empty line is a sentence of no words: it scores ``<eos>`` alone (nothing with
``--no-eos``: log-probability 0, 0 tokens, perplexity ``nan``). A word outside the vocabulary is
scored as ``<unk>`` under ``--oov-penalty`` (by default the unknown class's probability shared
among its word types; see :mod:`reglm.api`) and counted in the ``oov`` column; a model without
``<unk>`` refuses the line instead. The OOV setting is printed on standard error before the
scores and is a field of every JSON line. The TSV is the ``csv`` module's dialect
(:func:`reglm.evaluate.word_probs.tsv`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reglm.cli.common import check_output_file, refuse_inputs, write_output
from reglm.errors import ReglmError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "score",
        help="score every line of a file as a sentence (n-best rescoring): log-probability, tokens, OOVs, perplexity",
    )
    p.add_argument(
        "run", help="run directory (or a model directory); only its vocabulary and model are read, no corpus"
    )
    p.add_argument("file", help="one sentence per line, or ID<TAB>sentence per line; - reads standard input")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument(
        "--base",
        choices=["e", "10"],
        default="e",
        help="log base of the output: e (natural) or 10 (KenLM, ASR decoders); the column header says which",
    )
    p.add_argument(
        "--format",
        choices=["tsv", "jsonl"],
        default="tsv",
        help="output format (TSV with a header line, or one JSON object per line)",
    )
    p.add_argument(
        "--words",
        action="store_true",
        help="one row per word instead of per sentence: id, position, word, log-prob, OOV flag",
    )
    p.add_argument(
        "--input",
        choices=["auto", "plain", "ids"],
        default="auto",
        help="plain lines, or ID<TAB>sentence lines; auto: ids when the first line holds a tab",
    )
    p.add_argument("--no-eos", dest="eos", action="store_false", help="do not score the <eos> that ends each sentence")
    p.add_argument(
        "--oov-penalty",
        default="share",
        metavar="share|none|X",
        help="score of a word outside the vocabulary: share (default) log p(<unk>) - log(unknown word types "
        "of the training text); X: log p(<unk>) - X in --base units (a decoder's unk offset, e.g. 10); "
        "none: the raw log p(<unk>) (the perplexity protocol)",
    )
    p.add_argument(
        "--carry",
        action="store_true",
        help="carry the context from one line into the next (a document) instead of scoring each line alone",
    )
    p.add_argument(
        "--out", metavar="FILE", help="write the scores to FILE (written atomically) instead of standard output"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_score)


@dataclass
class Line:
    """One input line: its id (the given one, or the 1-based line number) and its sentence."""

    id: str
    sentence: str


def read_lines(path: str, fmt: str) -> list[Line]:
    """The lines of ``path`` (``-``: standard input) as :class:`Line`; a line that is not UTF-8,
    or a plain line in an ``ID<TAB>sentence`` file, is a ReglmError naming it."""
    name = "standard input" if path == "-" else path
    if path == "-":
        if sys.stdin is None:
            raise ReglmError("standard input is closed; give the sentences in a FILE, or on an open standard input")
        data = sys.stdin.buffer.read()
    else:
        if Path(path).is_dir():
            raise ReglmError(f"{path} is a directory; give a text file with one sentence per line")
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise ReglmError(
                f"{path} does not exist; give a text file with one sentence per line (or - for standard input)"
            ) from None
    raw = data.split(b"\n") if data else []
    if data.endswith(b"\n"):
        raw.pop()
    texts = []
    for number, line in enumerate(raw, 1):
        try:
            texts.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as exc:
            raise ReglmError(
                f"{name} line {number} is not UTF-8 (byte {exc.start}); convert the file to UTF-8 (e.g. iconv -t utf-8)"
            ) from None
    with_ids = fmt == "ids" or (fmt == "auto" and bool(texts) and "\t" in texts[0])
    if not with_ids:
        return [Line(str(number), text) for number, text in enumerate(texts, 1)]
    lines = []
    for number, text in enumerate(texts, 1):
        if "\t" not in text:
            raise ReglmError(
                f"{name} line {number} has no tab: the file is read as ID<TAB>sentence lines; give every line an "
                "id, or pass --input plain"
            )
        ident, sentence = text.split("\t", 1)
        lines.append(Line(ident, sentence))
    return lines


def cmd_score(args: argparse.Namespace) -> int:
    from reglm.api import load
    from reglm.devices import resolve_device
    from reglm.evaluate.words import describe_oov, oov_offset

    check_output_file("--out", args.out)
    refuse_inputs("--out", args.out, [args.file, args.run, Path(args.run) / args.checkpoint])
    if args.out is None and sys.stdout is None:
        raise ReglmError("standard output is closed; give --out FILE, or run with an open standard output")
    lines = read_lines(args.file, args.input)
    lm = load(args.run, args.checkpoint, resolve_device(args.device))
    if lm.vocab.unk_id is None and lm.subword is None:
        for number, line in enumerate(lines, 1):
            unknown = [w for w in line.sentence.split() if w not in lm.vocab]
            if unknown:
                raise ReglmError(
                    f"line {number} ({line.id}): {unknown[0]!r} is not in the model's vocabulary, which has no "
                    "<unk> to score it with; remove the line or use a model trained with <unk>"
                )
    penalty = None if args.oov_penalty == "none" else args.oov_penalty
    oov_offset(lm.vocab, penalty, args.base)
    setting = f"{describe_oov(lm.vocab, penalty, args.base)} (--oov-penalty {args.oov_penalty})"
    from reglm.progress import plan

    start = time.perf_counter()
    with plan([1]):
        sentences = [line.sentence for line in lines]
        scored = lm.full_scores_batch(sentences, args.base, args.eos, args.carry, progress=True, oov_penalty=penalty)
    seconds = time.perf_counter() - start
    text = _render(lines, scored, args)
    if args.out is None:
        _write_stdout(text)
    else:
        from reglm.io import write_text

        write_output("--out", args.out, lambda: write_text(Path(args.out), text))
    tokens = sum(len(words) for words in scored)
    oov = sum(w.oov for words in scored for w in words)
    ppl = _perplexity([w for words in scored for w in words], args.base)
    rate = f"{len(lines) / seconds:.0f} sentences/s, {tokens / seconds:.0f} tokens/s" if seconds > 0 else "instant"
    print(
        f"scored {len(lines)} sentences, {tokens} tokens ({oov} OOV), perplexity {ppl:.2f}, in {seconds:.2f} s "
        f"({rate})",
        file=sys.stderr,
    )
    print(f"reglm score: an OOV word scored {setting}", file=sys.stderr)
    return 0


def _write_stdout(text: str) -> None:
    """``text`` on standard output; a failing write (a full device) is a ReglmError (a reader
    that left, ``BrokenPipeError``, ends the command quietly)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        # what stays buffered is dropped, not flushed again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        reason = exc.strerror or exc
        fix = "give --out FILE on a disk with room"
        raise ReglmError(f"cannot write the scores to standard output ({reason}); {fix}") from None


def _render(lines: list[Line], scored: list[list[Any]], args: argparse.Namespace) -> str:
    column = "log10_prob" if args.base == "10" else "ln_prob"
    rows: list[dict[str, Any]] = []
    for line, words in zip(lines, scored):
        if args.words:
            rows.extend(
                {"id": line.id, "position": i, "word": w.word, column: w.log_prob, "oov": int(w.oov)}
                for i, w in enumerate(words)
            )
        else:
            rows.append(
                {
                    "id": line.id,
                    column: sum(w.log_prob for w in words),
                    "tokens": len(words),
                    "oov": sum(w.oov for w in words),
                    "ppl": _perplexity(words, args.base),
                }
            )
    header = ["id", "position", "word", column, "oov"] if args.words else ["id", column, "tokens", "oov", "ppl"]
    if args.format == "jsonl":
        named = args.oov_penalty in ("share", "none")
        setting = {"oov_penalty": args.oov_penalty if named else float(args.oov_penalty)}
        records = (
            {key: (None if isinstance(v, float) and math.isnan(v) else v) for key, v in row.items()} | setting
            for row in rows
        )
        return "".join(json.dumps(record) + "\n" for record in records)
    from reglm.evaluate.word_probs import tsv

    return tsv(header, ([_cell(row[key]) for key in header] for row in rows))


def _perplexity(words: list[Any], base: str) -> float:
    """The perplexity of scored words (their log-probabilities in ``base`` units)."""
    from reglm.evaluate.perplexity import perplexity_of

    return perplexity_of(-sum(w.log_prob for w in words), len(words), base)


def _cell(value: Any) -> str:
    return f"{value:.9g}" if isinstance(value, float) else str(value)
