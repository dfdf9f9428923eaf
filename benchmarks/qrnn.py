"""QRNN costs: training throughput against the AWD-LSTM, and the fo-pooling scan against the loop.

1. **Training throughput.** The ``qrnn-ptb`` model (4 QRNN layers of 1550, the first of window
   2, 400-d tied embedding, every dropout, DropConnect 0.1 on the gate weights) against the
   ``awd-lstm-ptb`` model (3 LSTM layers of 1150, DropConnect 0.5 on the recurrent weights), both
   built from their presets as the trainer builds them, V = 10,000, the same batch size and BPTT
   length (the reference README compares them at batch 20): the step of
   ``benchmarks/throughput.py`` (forward, AR/TAR, backward, clipping, SGD, state carried and
   detached), interleaved rounds. Tokens/s of each and the ratio QRNN / AWD-LSTM.
2. **The scan.** fo-pooling (``reglm.encoders.qrnn.fo_pool``: the odd-even parallel scan, one
   autograd node) against ``fo_pool_reference`` (the readable loop over time steps, autograd
   through every step) on random gates ``(B, T, H)``, T = 70: forward + backward, and forward
   alone under ``no_grad``, interleaved; the largest difference between the two outputs is
   reported too. The issue's target: the scan >= 10x faster than the loop on a CPU.

    python benchmarks/qrnn.py --device cpu --steps 6 --rounds 3 --warmup 1
    python benchmarks/qrnn.py --device cuda --steps 50
    python benchmarks/qrnn.py --dry-run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, environment, interleaved, random_batches, save  # noqa: E402
from throughput import Trainer  # noqa: E402

from reglm.config import build_config  # noqa: E402
from reglm.encoders.qrnn import fo_pool, fo_pool_reference  # noqa: E402
from reglm.models import LanguageModel  # noqa: E402

MODELS = {"qrnn": "qrnn-ptb", "awd-lstm": "awd-lstm-ptb"}
DRY_MODELS = {"qrnn": "qrnn-tiny", "awd-lstm": "tiny"}
SCAN_TARGET = 10.0


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BxH[,BxH...], e.g. 20x1550") from None


def training_throughput(
    presets: dict[str, str], vocab_size: int, batch_size: int, bptt: int, args: argparse.Namespace, device: torch.device
) -> dict:
    torch.manual_seed(args.seed)
    batches = random_batches(vocab_size, batch_size, bptt, args.seed, device)
    models = {
        name: LanguageModel(build_config(preset).model, vocab_size).to(device) for name, preset in presets.items()
    }
    trainers = {name: Trainer(model, regularized=True) for name, model in models.items()}
    steps_of = {name: (lambda i, t=t: t.step(*batches[i % len(batches)])) for name, t in trainers.items()}
    seconds, done = interleaved(steps_of, args.steps, args.rounds, args.warmup, device)
    tps = {name: done[name] * batch_size * bptt / seconds[name] for name in trainers}
    return {
        "presets": presets,
        "parameters": {name: model.num_parameters() for name, model in models.items()},
        "vocab_size": vocab_size,
        "batch_size": batch_size,
        "bptt": bptt,
        "warmup_steps": args.warmup,
        "timed_steps": done,
        "rounds": args.rounds,
        "seconds": seconds,
        "tokens_per_s": tps,
        "ratio_qrnn_over_awd_lstm": tps["qrnn"] / tps["awd-lstm"],
        "final_loss": {name: float(t.last_loss) for name, t in trainers.items()},
    }


def scan_versus_loop(batch: int, hidden: int, steps: int, args: argparse.Namespace, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    f = torch.sigmoid(torch.randn(batch, steps, hidden, generator=generator)).to(device).requires_grad_()
    z = torch.tanh(torch.randn(batch, steps, hidden, generator=generator)).to(device).requires_grad_()
    c0 = torch.randn(batch, hidden, generator=generator).to(device).requires_grad_()
    weights = torch.randn(batch, steps, hidden, generator=generator).to(device)

    def train_step(pool):
        def step(_: int) -> None:
            torch.autograd.grad((pool(f, z, c0) * weights).sum(), (f, z, c0))

        return step

    def eval_step(pool):
        def step(_: int) -> None:
            with torch.no_grad():
                pool(f, z, c0)

        return step

    with torch.no_grad():
        difference = (fo_pool(f, z, c0) - fo_pool_reference(f, z, c0)).abs().max().item()
    result = {"batch": batch, "hidden": hidden, "steps": steps, "max_abs_difference": difference}
    for mode, make in (("forward_backward", train_step), ("forward", eval_step)):
        seconds, done = interleaved(
            {"scan": make(fo_pool), "loop": make(fo_pool_reference)}, args.scan_repeats, args.rounds, 1, device
        )
        per_call = {name: seconds[name] / done[name] for name in seconds}
        result[mode] = {"seconds_per_call": per_call, "speedup_scan_over_loop": per_call["loop"] / per_call["scan"]}
    result["meets_target"] = result["forward_backward"]["speedup_scan_over_loop"] >= SCAN_TARGET
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps per model before timing")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds the steps are split into")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=20,
        help="training streams per batch, both models (the reference README's PTB comparison: 20)",
    )
    parser.add_argument("--bptt", type=int, default=70)
    parser.add_argument(
        "--scan-sizes",
        type=_sizes,
        default=_sizes("20x1550,8x256"),
        help="BxH of the scan comparison (default: the qrnn-ptb layer, and a small one)",
    )
    parser.add_argument("--scan-steps", type=int, default=70, help="T of the scan comparison")
    parser.add_argument("--scan-repeats", type=int, default=20, help="timed calls of each pooling per mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the tiny presets and a small scan, 2 steps: checks the script, measures nothing of interest",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: benchmarks/results/qrnn-<device>.json (a dry run saves nothing unless given)",
    )
    args = parser.parse_args(argv)
    if (
        min(args.steps, args.rounds, args.scan_repeats, args.scan_steps, args.batch_size, args.bptt) < 1
        or args.warmup < 0
    ):
        parser.error(
            "--steps, --rounds, --scan-repeats, --scan-steps, --batch-size and --bptt must be >= 1, --warmup >= 0"
        )
    presets, vocab_size = MODELS, 10_000
    if args.dry_run:
        presets, vocab_size = DRY_MODELS, 1_000
        args.steps, args.rounds, args.warmup, args.scan_repeats, args.batch_size, args.bptt = 2, 1, 1, 2, 4, 12
        args.scan_sizes = [(2, 16)]

    device = torch.device(args.device)
    result = {
        "benchmark": "QRNN: training throughput vs AWD-LSTM; fo-pooling scan vs reference loop",
        **environment(device, "qrnn.py", argv),
        "dry_run": args.dry_run,
        "training": training_throughput(presets, vocab_size, args.batch_size, args.bptt, args, device),
        "scan": [scan_versus_loop(b, h, args.scan_steps, args, device) for b, h in args.scan_sizes],
        "target_scan_speedup": SCAN_TARGET,
    }
    out = args.out or (None if args.dry_run else RESULTS / f"qrnn-{device.type}.json")
    if out is None:
        print(
            f"dry run: QRNN {result['training']['tokens_per_s']['qrnn']:,.0f} tok/s, scan "
            f"{result['scan'][0]['forward_backward']['speedup_scan_over_loop']:.1f}x the loop (not saved)"
        )
    else:
        save(result, out)
    return result


if __name__ == "__main__":
    main()
