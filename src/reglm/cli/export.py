"""``reglm export``: a trained model as an ONNX graph or a TorchScript module, float32 or int8."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

EVAL_TOKENS = 10_000
"""Tokens of the run's validation split that measure int8's perplexity change when no --text is given."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a trained model for inference without reglm (ONNX or TorchScript, optionally int8), checked "
        "against PyTorch",
        description="Writes OUT/model.onnx (or model.pt), vocab.txt and export.json (tensor names, shapes, special "
        "ids, checks); see docs/deployment.md.",
    )
    p.add_argument("run", help="a run directory (its best/ or last/ model) or a model directory")
    p.add_argument(
        "--format",
        required=True,
        metavar="onnx|torchscript",
        help="onnx (opset 17, run by onnxruntime) or torchscript (torch.jit.load)",
    )
    p.add_argument(
        "--quantize",
        metavar="int8",
        help="int8 dynamic quantization (LSTM, linear and embedding weights); reports the size and the perplexity "
        "change",
    )
    p.add_argument(
        "--out",
        help="the export directory (default: the model directory's path + -FORMAT[-int8], e.g. RUN/best-onnx); "
        "the files of a previous export there are replaced, no other file is touched",
    )
    p.add_argument(
        "--text",
        help="with --quantize: a text file (one sentence per line) to measure the perplexity change on (default: "
        f"the first {EVAL_TOKENS:,} tokens of the run's validation split)",
    )
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.set_defaults(func=cmd_export)


def _eval_text(args: argparse.Namespace, lm: Any, directory: Path) -> tuple[Any, str]:
    """Token ids of the text that measures int8's perplexity change, and what it is."""
    from reglm.errors import ReglmError

    if args.text is not None:
        path = Path(args.text)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ReglmError(
                f"--text {path} cannot be read ({getattr(exc, 'strerror', None) or exc}); give a UTF-8 text file"
            ) from None
        return [lm.vocab.eos_id, *lm.text_to_ids(text)], str(path)
    from reglm.config import RunConfig
    from reglm.data import load_corpus
    from reglm.modeldir import read_model_meta

    config = RunConfig.from_dict(read_model_meta(directory)["config"], source=str(directory))
    try:
        corpus = load_corpus(config, lm.vocab)
    except ReglmError as exc:
        raise ReglmError(
            f"the validation split of {config.data.name!r} (the run's corpus) cannot be read to measure the "
            f"perplexity change ({exc}); give --text FILE"
        ) from None
    ids = corpus.valid[:EVAL_TOKENS]
    return [lm.vocab.eos_id, *ids.tolist()], f"the first {len(ids):,} tokens of {config.data.name} valid"


def cmd_export(args: argparse.Namespace) -> int:
    from reglm.api import load
    from reglm.cli.common import refuse_inputs, writing_into
    from reglm.errors import ReglmError
    from reglm.export import export_model
    from reglm.export.bundle import FORMATS, SPEC_FILE, check_options
    from reglm.rundir import TOKENIZER_FILE, VOCAB_FILE, model_dir

    check_options(args.format, args.quantize)
    if args.text is not None and args.quantize is None:
        raise ReglmError("--text measures the perplexity change of int8; give --quantize int8 with it")
    directory = model_dir(args.run, args.checkpoint)
    lm = load(directory)
    suffix = f"-{args.quantize}" if args.quantize else ""
    out = Path(args.out) if args.out else directory.with_name(f"{directory.name}-{args.format}{suffix}")
    refuse_inputs("--out", out, [directory])
    for name in (FORMATS[args.format].file, VOCAB_FILE, TOKENIZER_FILE, SPEC_FILE):
        refuse_inputs(f"--out {out}: the file", out / name, [directory, args.text])
    eval_ids, eval_source = _eval_text(args, lm, directory) if args.quantize else (None, "")
    with writing_into(out):
        spec = export_model(lm, out, args.format, args.quantize, eval_ids, eval_source, source=directory)
    check, quant = spec["check"], spec["quantization"]
    size = (out / spec["file"]).stat().st_size
    print(f"wrote {out}: {spec['file']} ({size / 1e6:.2f} MB, {spec['precision']}), vocab.txt, export.json")
    stream = f"{check['streams']} streams x chunks of {'/'.join(map(str, check['chunks']))} tokens" + (
        ", state carried" if check["state_carried"] else ", independent blocks"
    )
    against = (
        " (int8 against the float32 PyTorch model: the quantization error; the float32 export passed the check first)"
        if quant
        else ""
    )
    print(
        f"check: max |log p({args.format}) - log p(PyTorch)| = {check['max_abs_log_prob_diff']:.3g} over {stream} "
        f"({check['runtime']}){against}"
    )
    if quant is not None:
        ppl = quant["perplexity"]
        print(
            f"int8: {quant['int8_bytes'] / 1e6:.2f} MB vs {quant['float32_bytes'] / 1e6:.2f} MB float32 "
            f"(x{quant['size_ratio']:.2f}); "
            f"perplexity on {ppl['text']}: {ppl['float32']:.2f} float32 -> {ppl['int8']:.2f} int8 "
            f"({100 * ppl['change']:+.2f}%)"
        )
    return 0
