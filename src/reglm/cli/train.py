"""``reglm train`` (start or resume a run), ``reglm train-discriminator`` and ``reglm finetune``
(runs that start from a trained model, Popov & Kudinov 2019)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reglm.cli.common import add_data_options, handling_signals, with_absolute_paths
from reglm.errors import ReglmError


def register(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model (default: a small LSTM on the synthetic trigram corpus)")
    p.add_argument("--preset", help="a bundled preset (see `reglm presets`) or a YAML file")
    add_data_options(p)
    p.add_argument("--out", help="run directory (default: runs/<preset>-<time>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its last checkpoint")
    _add_tensorboard(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. train.optimizer.lr=10 model.input.emb_size=400 "
        "(`reglm config` lists every option)",
    )

    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "train-discriminator", help="train a discriminator against a trained model (Popov & Kudinov 2019, eq. 6)"
    )
    p.add_argument("run", help="the language model's run directory (or model directory): the frozen q0")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument(
        "--preset",
        default="discriminator",
        help="training settings (default: discriminator, the paper's PTB settings; discriminator-wt2)",
    )
    p.add_argument(
        "--init-from-model",
        action="store_true",
        help="start from the language model's weights instead of a fresh initialization",
    )
    p.add_argument("--out", help="run directory (default: runs/discriminator-<time>)")
    _add_tensorboard(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="training overrides, e.g. train.optimizer.lr=0.5 model.encoder.hidden_dropout=0",
    )

    p.set_defaults(func=cmd_train_discriminator)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a trained model with a discriminator-estimated reverse KL (Popov & Kudinov 2019, eq. 12)",
    )
    p.add_argument("run", help="the language model's run directory (or model directory): the starting point q0")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--discriminator", metavar="DISC_RUN", help="a run of `reglm train-discriminator` for this model")
    how.add_argument(
        "--without-discriminator", action="store_true", help="r = 1/2 everywhere (the paper's ablation, Table 2)"
    )
    how.add_argument(
        "--cross-entropy",
        action="store_true",
        help="fine-tune with cross-entropy only (the baseline of the paper's section 3)",
    )
    p.add_argument(
        "--preset",
        default="dfinetune",
        help="training settings (default: dfinetune, the paper's PTB settings; dfinetune-wt2)",
    )
    p.add_argument("--out", help="run directory (default: runs/finetune-<time>)")
    _add_tensorboard(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="training overrides, e.g. train.optimizer.lr=0.1 model.encoder.hidden_dropout=0.3",
    )
    p.set_defaults(func=cmd_finetune)


def _add_tensorboard(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the metrics as TensorBoard scalars into RUN/tensorboard/ (train.log.tensorboard=true; pip "
        "install 'reglm[tensorboard]')",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    """The KEY=VALUE overrides, with the ones the flags stand for."""
    return [*args.overrides, *(["train.log.tensorboard=true"] if args.tensorboard else [])]


def cmd_train(args: argparse.Namespace) -> int:
    from reglm.config import build_config
    from reglm.train.run import resume, train

    if args.resume:
        if args.preset or args.overrides or args.data or args.out or args.tensorboard:
            raise ReglmError(
                "--resume continues a run with its saved configuration; drop "
                "--preset/--data/--out/--tensorboard/overrides"
            )
        with stop_on_signals() as stop:
            resume(Path(args.resume), stop=stop)
        return 0
    extra = _overrides(args)
    for flag, key in (
        ("data", "data.name"),
        ("data_dir", "data.data_dir"),
        ("min_freq", "data.min_freq"),
        ("max_vocab", "data.max_vocab"),
    ):
        value = getattr(args, flag)
        if value is not None:
            extra.append(f"{key}={value}")
    config = with_absolute_paths(build_config(args.preset, extra))
    out = (
        Path(args.out)
        if args.out
        else Path("runs") / f"{Path(args.preset or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    with stop_on_signals() as stop:
        train(config, out, stop=stop)
    return 0


def _continue_from(
    run: str, checkpoint: str, preset: str, overrides: list[str], objective: dict[str, Any], what: str, out: str | None
) -> None:
    """Train a run that starts from the trained model in ``run`` (a discriminator, a fine-tuning)."""
    from reglm.config import RunConfig, derive_config
    from reglm.modeldir import read_model_meta
    from reglm.rundir import model_dir, require_kind
    from reglm.train.run import train

    directory = model_dir(run, checkpoint).resolve()
    base = with_absolute_paths(RunConfig.from_dict(read_model_meta(directory)["config"], source=str(directory)))
    require_kind(base.objective.kind, directory, "lm")
    config = derive_config(base, preset, overrides, {"base_model": str(directory), **objective}, what)
    with stop_on_signals() as stop:
        train(
            config,
            Path(out) if out else Path("runs") / f"{objective['kind']}-{time.strftime('%Y%m%d-%H%M%S')}",
            stop=stop,
        )


def cmd_train_discriminator(args: argparse.Namespace) -> int:
    objective = {"kind": "discriminator", "init_from_base": args.init_from_model}
    _continue_from(args.run, args.checkpoint, args.preset, _overrides(args), objective, "a discriminator", args.out)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from reglm.rundir import model_dir

    if args.cross_entropy:
        objective: dict[str, Any] = {"kind": "lm"}
    else:
        disc = None if args.without_discriminator else str(model_dir(args.discriminator, "best").resolve())
        objective = {"kind": "reverse-kl", "discriminator": disc}
    _continue_from(args.run, args.checkpoint, args.preset, _overrides(args), objective, "fine-tuning", args.out)
    return 0


@contextmanager
def stop_on_signals() -> Iterator[Any]:
    """A :class:`~reglm.train.run.StopRequest` that SIGINT/SIGTERM set: the first signal asks the
    trainer to checkpoint at the end of its step, a second one aborts at once (so does the first
    during the final evaluation of a complete run)."""
    from reglm.train.run import StopRequest

    stop = StopRequest()

    def handler(signum: int, _frame: Any) -> None:
        if stop.immediate and not stop.requested:
            stop.request(signum)
            raise KeyboardInterrupt
        if stop.requested:
            raise KeyboardInterrupt
        stop.request(signum)
        print(
            "reglm: stop requested: saving a checkpoint at the end of this step (send again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )

    with handling_signals(handler):
        yield stop
