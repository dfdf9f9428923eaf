"""``reglm study``: the papers' controlled experiments, end to end, as commands.

* ``reglm study trigram`` -- Popov & Kudinov (2019), section 3 (:mod:`reglm.studies.trigram`);
* ``reglm study subspace`` -- Inan, Khosravi & Socher (2017), section 6.2
  (:mod:`reglm.studies.subspace`).

Each writes its figure and JSON into ``--out``; bad options are :class:`ReglmError` (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reglm.cli.common import add_data_options, writing_into
from reglm.cli.train import stop_on_signals
from reglm.errors import ReglmError


def register(sub: Any) -> None:
    """Add ``study trigram|subspace`` to the subcommands ``sub`` of the ``reglm`` parser."""
    p = sub.add_parser("study", help="the papers' controlled experiments, end to end: figure + JSON")
    p.set_defaults(func=cmd_study)
    ssub = p.add_subparsers(dest="study", required=True)
    t = ssub.add_parser(
        "trigram",
        help="Popov & Kudinov 2019, section 3: discriminator fine-tuning on the synthetic trigram corpus (Table 1, "
        "Figure 1)",
    )
    t.add_argument(
        "--out",
        required=True,
        help="study directory: one run directory per stage, trigram-study.json and .png (resumable)",
    )
    for name, kind, help_text in (
        ("sentences", int, "training sentences (default 80000, the paper's)"),
        ("hidden", int, "LSTM units and embedding size (default 256)"),
        ("batch-size", int, "streams per batch (default 1024)"),
        (
            "bptt",
            int,
            "BPTT window (default 11: one 10-word sentence and its <eos> per stream, so a batch holds 1024 sentences)",
        ),
        ("lr", float, "initial model's and discriminators' learning rate (default 1.0)"),
        ("clip", float, "gradient clipping (default 1.0)"),
        ("embed-init", float, "the embedding is drawn from U(-r, r): r (default 1.0; appendix A does not say)"),
        ("epochs", int, "most epochs of the initial model (default 100; the rate drops x0.1 on plateaus)"),
        ("plateau-stop", float, "stop initial model, discriminators at rate lr x this (0.001: 3rd drop; 0: off)"),
        ("disc-epochs", int, "most discriminator epochs (default 30)"),
        ("disc-lr", float, "discriminators' learning rate (default: --lr)"),
        ("finetune-epochs", int, "fine-tuning epochs (default 2)"),
        ("finetune-lr", float, "learning rate of the discriminator fine-tuning (default 1.0)"),
        ("chosen-rank", int, "frequency rank of the perturbed word (default 100; 51-150 are 'almost frequent')"),
        ("perturb-bias", float, "the perturbed word's output bias (default -20)"),
        ("seed", int, "seed of the corpus and of every run (default 0)"),
        ("synthetic-rule", str, "the corpus rule: stream (default) or restart (studies before the option)"),
        ("valid-sentences", int, "Figure 1 (left): validation sentences scored after each step (1000; 0: off)"),
    ):
        t.add_argument(f"--{name}", type=kind, help=help_text)
    t.add_argument(
        "--ce-lrs", help="comma-separated learning rates of the cross-entropy fine-tunings (default 0.1,0.01)"
    )
    t.add_argument(
        "--track-ranks",
        help="Figure 2: comma-separated frequency ranks of words whose probability every fine-tuning step logs "
        "(default 75,10: an almost frequent and a frequent word)",
    )
    t.add_argument(
        "--sequence-loss",
        action=argparse.BooleanOptionalAction,
        help="lr and clip refer to each sentence's summed loss, averaged over the batch (default); "
        "--no-sequence-loss: to the mean over tokens (appendix A does not say)",
    )
    t.add_argument("--device", help="auto, cpu, cuda (default auto)")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")
    t = ssub.add_parser(
        "subspace",
        help="Inan et al. 2017, section 6.2: subspace distance vs the augmented loss's weight and temperature "
        "(Figure 1)",
    )
    t.add_argument("--out", required=True, help="directory for subspace-study.json and .png")
    add_data_options(t, with_vocab=False)
    for name, kind, help_text in (
        ("words", int, "contiguous training words per run (default 20000)"),
        ("hidden", int, "LSTM units and embedding size (default 300)"),
        ("epochs", int, "passes over the slice per training (default 40; with --until-flat, the most)"),
        ("batch-size", int, "streams (default 5)"),
        ("bptt", int, "BPTT window (default 35)"),
        ("lr", float, "learning rate (default: 2e-3 for adam, 1.0 for sgd)"),
        ("clip", float, "gradient clipping, 0: off (default: off for adam, 5 for sgd)"),
        ("tau-a", float, "temperature of panel (a) (default 10)"),
        ("runs", int, "repeats averaged per point (default 10, the paper's)"),
        (
            "until-flat",
            int,
            "stop a training once its objective has moved by at most 0.1%% an epoch over N epochs (0: off)",
        ),
        ("seed", int, "base seed of the slices and initializations (default 0)"),
    ):
        t.add_argument(f"--{name}", type=kind, help=help_text)
    t.add_argument("--optimizer", choices=["adam", "sgd"], help="default adam (the paper does not say)")
    t.add_argument(
        "--encoder",
        choices=["vd-lstm", "awd-lstm"],
        help="the LSTM (default vd-lstm without dropout, initialized U(-0.1, 0.1))",
    )
    t.add_argument(
        "--target-grad", action="store_true", help="let gradient flow into the embedding through y_tilde too"
    )
    t.add_argument("--free-embedding", action="store_true", help="do not keep the input-embedding rows at unit norm")
    t.add_argument("--no-output-bias", action="store_true", help="b = 0, as the paper's section 4 assumes")
    t.add_argument(
        "--betas", help="panel (a): comma-separated proportions of the augmented loss (default 0,0.2,0.4,0.6,0.8,1)"
    )
    t.add_argument("--taus", help="panel (b): comma-separated temperatures (default 1,2,5,10,20,40)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")


def _floats(option: str, text: str) -> tuple[float, ...]:
    """``"0.1,0.01"`` -> ``(0.1, 0.01)``; anything else is a ReglmError naming ``option``."""
    try:
        return tuple(float(item) for item in text.split(","))
    except ValueError:
        raise ReglmError(f"{option} {text!r} must be comma-separated numbers, e.g. 0.1,0.01") from None


def cmd_study(args: argparse.Namespace) -> int:
    return STUDIES[args.study](args)


def _study_trigram(args: argparse.Namespace) -> int:
    from reglm.studies.trigram import TrigramStudySpec, run_trigram_study

    names = (
        "sentences",
        "hidden",
        "batch_size",
        "bptt",
        "lr",
        "clip",
        "sequence_loss",
        "embed_init",
        "epochs",
        "plateau_stop",
        "disc_epochs",
        "disc_lr",
        "finetune_epochs",
        "finetune_lr",
        "chosen_rank",
        "perturb_bias",
        "seed",
        "synthetic_rule",
        "valid_sentences",
        "device",
    )
    options: dict[str, Any] = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.ce_lrs is not None:
        options["ce_lrs"] = _floats("--ce-lrs", args.ce_lrs)
    if args.track_ranks is not None:
        try:
            options["tracked_ranks"] = tuple(int(item) for item in args.track_ranks.split(","))
        except ValueError:
            raise ReglmError(f"--track-ranks {args.track_ranks!r} must be comma-separated ranks, e.g. 75,10") from None
    spec = TrigramStudySpec(**options)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file; give a directory for the study")
    with stop_on_signals() as stop:
        result = run_trigram_study(out, spec, progress=sys.stderr.isatty() and not args.json, stop=stop)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"chosen word {result['chosen_word']} (rank {result['chosen_rank']}); fixed context: "
        f"{' '.join(result['context'])}"
    )
    print(f"{'model':24s} {'test ppl':>9s} {'freq ppl':>9s} {'rare ppl':>9s} {'ratio':>6s} {'log q - log p':>16s}")
    for name, row in result["table"].items():
        diff = (
            f"{row['logq_minus_logp_mean']:+.3f} ± {row['logq_minus_logp_std']:.3f}"
            if "logq_minus_logp_mean" in row
            else ""
        )
        print(
            f"{name:24s} {row['test_ppl']:9.2f} {row['frequent_ppl']:9.2f} {row['rare_ppl']:9.2f} "
            f"{row['ratio']:6.1f} {diff:>16s}"
        )
    for rank, word in result["tracked"].items():
        print(
            f"figure 2: word {word['word']} (rank {rank}), true probability {word['true_prob']:.3g} after: "
            f"{' '.join(word['context'])}"
        )
    print(f"wrote {out / 'trigram-study.json'}, {out / 'trigram-study.png'} and {out / 'trigram-study-figure2.png'}")
    return 0


def _study_subspace(args: argparse.Namespace) -> int:
    from reglm.analysis.plots import plot_subspace_study
    from reglm.data import resolve
    from reglm.devices import resolve_device
    from reglm.io import write_json
    from reglm.studies.subspace import SubspaceStudySpec, run_subspace_study

    names = (
        "words",
        "hidden",
        "epochs",
        "batch_size",
        "bptt",
        "lr",
        "clip",
        "tau_a",
        "runs",
        "seed",
        "optimizer",
        "encoder",
        "until_flat",
    )
    options: dict[str, Any] = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    options.update(target_grad=args.target_grad, unit_norm=not args.free_embedding, output_bias=not args.no_output_bias)
    for name in ("betas", "taus"):
        if getattr(args, name) is not None:
            options[name] = _floats(f"--{name}", getattr(args, name))
    spec = SubspaceStudySpec(**options)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ReglmError(f"--out {out} is a file; give a directory for subspace-study.json and .png")
    corpus = resolve(args.data or "ptb", data_dir=args.data_dir)
    result = run_subspace_study(
        corpus.train,
        len(corpus.vocab),
        spec,
        resolve_device(args.device),
        progress=sys.stderr.isatty() and not args.json,
    )
    result["data"] = corpus.name
    data, figure = out / "subspace-study.json", out / "subspace-study.png"
    with writing_into(out):
        write_json(data, result)
        plot_subspace_study(result, figure)
    if args.json:
        print(json.dumps(result))
        return 0
    for key, label in (("beta", f"tau = {spec.tau_a:g}"), ("tau", "beta = 1")):
        panel = result["panels"][key]
        print(f"{key:>6s}  distance (mean ± std over {spec.runs} run(s), {label})")
        for x, mean, std in zip(panel["x"], panel["mean"], panel["std"]):
            print(f"{x:6g}  {mean:.4f} ± {std:.4f}")
    print(f"wrote {data} and {figure}")
    return 0


STUDIES: dict[str, Callable[[argparse.Namespace], int]] = {"trigram": _study_trigram, "subspace": _study_subspace}
