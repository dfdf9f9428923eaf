"""Training-step cost of the adversarial softmax (Wang, Gong & Liu 2019) over the plain softmax.

Two identical AWD-LSTM models (same initial weights, same batches, every regularizer on) train
side by side, interleaved in one process; one computes its loss with AdvSoft (relative epsilon,
the presets' setting), the other with the plain softmax. This is done at the PTB (10,000) and
WikiText-2 (33,278) vocabulary sizes. The paper claims "virtually no additional overhead"; our
targets are <= 3% on GPU and <= 5% on CPU for the whole step.

A second, output-layer-only measurement times just logits + loss + backward for the same
``(B*T, E)`` hidden states, which isolates the softmax and bounds the overhead from above.

    python benchmarks/advsoft_overhead.py --device cuda --steps 60
    python benchmarks/advsoft_overhead.py --device cpu --steps 8 --rounds 4
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from harness import RESULTS, environment, interleaved, random_batches, save
from throughput import AR_ALPHA, CLIP, LR, PRESETS, TAR_BETA, WEIGHT_DECAY

from reglm.config import ModelConfig
from reglm.encoders.base import detach_state
from reglm.models import LanguageModel
from reglm.objectives.activation_reg import activation_reg, temporal_activation_reg

TARGET_OVERHEAD = {"cuda": 0.03, "cpu": 0.05}
ALPHA = 0.005


class Stepper:
    """One model trained with the AWD-LSTM step; ``adversarial`` picks the loss."""

    def __init__(
        self, model: LanguageModel, adversarial: bool, batches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self.model = model.train()
        self.adversarial = adversarial
        self.batches = batches
        self.params = list(model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.state = None

    def __call__(self, i: int) -> None:
        ids, targets = self.batches[i % len(self.batches)]
        out = self.model(ids, self.state)
        loss = self.model.output.score(out, targets, adversarial=self.adversarial).nll.mean()
        loss = loss + activation_reg(out.output, AR_ALPHA) + temporal_activation_reg(out.raw_output, TAR_BETA)
        self.state = detach_state(out.state)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class OutputStepper:
    """Only the output layer: logits, loss and backward for fixed hidden states."""

    def __init__(self, model: LanguageModel, adversarial: bool, hidden: torch.Tensor, targets: torch.Tensor) -> None:
        self.output = model.output
        self.adversarial = adversarial
        self.hidden = hidden.requires_grad_(True)
        self.targets = targets

    def __call__(self, _i: int) -> None:
        self.output.nll_of(self.hidden, self.targets, adversarial=self.adversarial).mean().backward()
        self.output.weight.grad = None
        self.hidden.grad = None


def measure(cfg: dict, vocab: int, batch: int, bptt: int, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    plain_cfg = ModelConfig.build(**cfg)
    adv_cfg = ModelConfig.build(**{**cfg, "advsoft": "relative", "advsoft_alpha": ALPHA})
    plain = LanguageModel(plain_cfg, vocab).to(device)
    adv = LanguageModel(adv_cfg, vocab).to(device)
    adv.load_state_dict(plain.state_dict())
    batches = random_batches(vocab, batch, bptt, args.seed, device)
    full, full_steps = interleaved(
        {"advsoft": Stepper(adv, True, batches), "plain": Stepper(plain, False, batches)},
        args.steps,
        args.rounds,
        args.warmup,
        device,
    )
    hidden = torch.randn(
        batch, bptt, plain_cfg.input.emb_size, generator=torch.Generator().manual_seed(args.seed + 1)
    ).to(device)
    out_steps = args.steps * args.output_repeats
    output, output_done = interleaved(
        {
            "advsoft": OutputStepper(adv, True, hidden.clone(), batches[0][1]),
            "plain": OutputStepper(plain, False, hidden.clone(), batches[0][1]),
        },
        out_steps,
        args.rounds,
        args.warmup,
        device,
    )
    return {
        "vocab_size": vocab,
        "full_step": {
            "steps": full_steps,
            "seconds_per_step": {k: v / full_steps[k] for k, v in full.items()},
            "overhead": full["advsoft"] / full["plain"] * full_steps["plain"] / full_steps["advsoft"] - 1,
        },
        "output_layer_only": {
            "steps": output_done,
            "seconds_per_step": {k: v / output_done[k] for k, v in output.items()},
            "overhead": output["advsoft"] / output["plain"] * output_done["plain"] / output_done["advsoft"] - 1,
        },
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset-size", choices=sorted(PRESETS), default="ptb", help="model and batch shapes (throughput.py's)"
    )
    parser.add_argument("--vocab-sizes", default="10000,33278", help="comma-separated; PTB and WikiText-2 by default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=60, help="timed full training steps per model and vocabulary")
    parser.add_argument("--output-repeats", type=int, default=5, help="output-layer-only steps per full step")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/advsoft-overhead-<device>.json"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.output_repeats < 1:
        parser.error("--steps, --rounds and --output-repeats must be >= 1, --warmup >= 0")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = torch.device(args.device)
    preset = PRESETS[args.preset_size]
    vocabs = [int(v) for v in args.vocab_sizes.split(",")]
    target = TARGET_OVERHEAD.get(device.type)
    runs = [measure(preset["model"], v, preset["batch_size"], preset["bptt"], args, device) for v in vocabs]
    result = {
        "benchmark": "AdvSoft training-step overhead over the plain softmax, same model and batches",
        **environment(device, "advsoft_overhead.py", argv),
        "preset_size": args.preset_size,
        "model": preset["model"],
        "batch_size": preset["batch_size"],
        "bptt": preset["bptt"],
        "advsoft": {"mode": "relative", "alpha": ALPHA},
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "results": runs,
        "target_overhead": target,
        "meets_target": None if target is None else all(r["full_step"]["overhead"] <= target for r in runs),
    }
    result["load_average_before_after"] = [load_before, result.pop("load_average")]
    save(result, args.out or RESULTS / f"advsoft-overhead-{device.type}.json")
    for r in runs:
        print(
            f"V={r['vocab_size']:>6}: full step overhead {100 * r['full_step']['overhead']:+.2f}% | output layer "
            f"only {100 * r['output_layer_only']['overhead']:+.2f}%"
        )
    return result


if __name__ == "__main__":
    main()
