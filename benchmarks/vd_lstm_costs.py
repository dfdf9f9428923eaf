"""Training-step costs of Inan et al.'s techniques on the VD-LSTM, measured side by side.

For one VD-LSTM size (``--size``: Table 1's small / medium / large) and each vocabulary size, four
models with the same initial weights train on the same batches, interleaved in one process
(batch 20, BPTT 35, the sequence-summed loss and clipping of the presets):

* ``vd``: the baseline with its variational-dropout masks (the per-step recurrence);
* ``vd+al``: the same plus the augmented loss (tau 20), whose extra cost is one ``(N, E) x (E, V)``
  product and its softmax -- the point of "cheap at V = 33k";
* ``re+al``: reused embeddings and the augmented loss (REAL);
* ``vd-p0``: the baseline at dropout 0, which runs the fused LSTM kernel: the price of the masks.

    python benchmarks/vd_lstm_costs.py --device cpu --size small --steps 12 --rounds 4
    python benchmarks/vd_lstm_costs.py --device cuda --size medium --steps 60
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from harness import RESULTS, environment, interleaved, random_batches, save

from reglm.config import ModelConfig
from reglm.encoders.base import detach_state
from reglm.models import LanguageModel
from reglm.objectives.augmented_loss import AugmentedLoss
from reglm.objectives.base import TermInputs

SIZES = {"small": (200, 0.7), "medium": (650, 0.5), "large": (1500, 0.35)}
BATCH, BPTT, TAU, GAMMA, CLIP = 20, 35, 20.0, 0.65, 5.0


class Stepper:
    """One model trained with the VD-LSTM presets' step (summed over time, clipped SGD at lr 1)."""

    def __init__(
        self, model: LanguageModel, aug_gamma: float, batches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self.model = model.train()
        self.terms = [AugmentedLoss(aug_gamma, TAU)] if aug_gamma > 0 else []
        self.batches = batches
        self.params = list(model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=1.0)
        self.state = None

    def __call__(self, i: int) -> None:
        ids, targets = self.batches[i % len(self.batches)]
        out = self.model(ids, self.state)
        scored = self.model.output.score(out, targets, keep_logits=bool(self.terms))
        loss = scored.nll.mean() + scored.penalty
        inputs = TermInputs(out, targets, scored.logits, self.model)
        for term in self.terms:
            loss = loss + term(inputs)
        loss = loss * ids.size(1)
        self.state = detach_state(out.state)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def measure(units: int, dropout: float, vocab: int, args: argparse.Namespace, device: torch.device) -> dict:
    base = dict(
        encoder="vd-lstm",
        emb_size=units,
        hidden_size=units,
        num_layers=2,
        input_dropout=dropout,
        hidden_dropout=dropout,
        tie_weights=False,
    )
    configs = {
        "vd": (ModelConfig.build(**base), 0.0),
        "vd+al": (ModelConfig.build(**base), GAMMA),
        "re+al": (ModelConfig.build(**{**base, "tie_weights": True, "output_bias": False}), GAMMA),
        "vd-p0": (ModelConfig.build(**{**base, "input_dropout": 0.0, "hidden_dropout": 0.0}), 0.0),
    }
    torch.manual_seed(args.seed)
    batches = random_batches(vocab, BATCH, BPTT, args.seed, device)
    steppers = {}
    for name, (cfg, aug) in configs.items():
        torch.manual_seed(args.seed)
        steppers[name] = Stepper(LanguageModel(cfg, vocab).to(device), aug, batches)
    seconds, steps = interleaved(steppers, args.steps, args.rounds, args.warmup, device)
    per_step = {name: seconds[name] / steps[name] for name in seconds}
    return {
        "vocab_size": vocab,
        "seconds_per_step": per_step,
        "tokens_per_s": {name: BATCH * BPTT / s for name, s in per_step.items()},
        "ratio_to_vd": {name: s / per_step["vd"] for name, s in per_step.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--vocab-sizes", default="10000,33278", help="comma-separated; PTB and WikiText-2 by default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/vd-lstm-costs-<size>-<device>.json"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    units, dropout = SIZES[args.size]
    runs = [measure(units, dropout, int(v), args, device) for v in args.vocab_sizes.split(",")]
    result = {
        "benchmark": "VD-LSTM training step: masks vs fused kernel, augmented loss, reused embeddings",
        **environment(device, "vd_lstm_costs.py", argv),
        "size": args.size,
        "units": units,
        "dropout": dropout,
        "batch_size": BATCH,
        "bptt": BPTT,
        "aug_tau": TAU,
        "aug_gamma": GAMMA,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "results": runs,
    }
    save(result, args.out or RESULTS / f"vd-lstm-costs-{args.size}-{device.type}.json")
    for r in runs:
        print(
            f"V={r['vocab_size']}: "
            + ", ".join(f"{name} {ratio:.3f}x" for name, ratio in r["ratio_to_vd"].items())
            + " of vd's step time"
        )
    return result


if __name__ == "__main__":
    main()
