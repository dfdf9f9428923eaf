"""Training throughput of the mixture of softmaxes (Yang et al. 2018) against the plain softmax.

Two AWD-LSTM models with the same encoder (the sizes and dropouts of a MoS preset: by default
``mos-awd-lstm-ptb``, 280/960/620, 3 layers, V = 10,000) train side by side, interleaved in one
process, on the same batches with the same step: forward, loss = mean NLL + AR + TAR (+ the
output layer's penalty, 0 here), backward, gradient clipping, SGD update, hidden state carried
and detached. One has the preset's MoS output layer (15 experts, tied to the embedding, latent
dropout); the other a plain softmax over the same last layer -- untied, because the last layer
(620) is wider than the embedding (280) and a plain tied softmax needs them equal. Tokens/s of
each and the ratio MoS / softmax are printed and saved as JSON with device, versions and the
load average before and after the run.

    python benchmarks/mos_throughput.py --device cuda --steps 50
    python benchmarks/mos_throughput.py --device cpu --threads 1 --batch-size 12 --bptt 35 --steps 16 \
        --rounds 16 --warmup 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch
from harness import RESULTS, environment, interleaved, random_batches, save

from reglm.config import build_config
from reglm.encoders.base import detach_state
from reglm.models import LanguageModel
from reglm.objectives.activation_reg import activation_reg, temporal_activation_reg
from reglm.outputs.softmax import SoftmaxConfig

VOCAB = {"ptb": 10_000, "wikitext-2": 33_278}


class Stepper:
    """One model trained with the recipe's step on fixed batches; ``__call__(i)`` is step ``i``."""

    def __init__(
        self,
        model: LanguageModel,
        batches: list[tuple[torch.Tensor, torch.Tensor]],
        lr: float,
        clip: float,
        weight_decay: float,
        ar: float,
        tar: float,
    ) -> None:
        self.model = model.train()
        self.batches = batches
        self.params = list(model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=lr, weight_decay=weight_decay)
        self.clip, self.ar, self.tar = clip, ar, tar
        self.state = None
        self.last_loss = float("nan")

    def __call__(self, i: int) -> None:
        ids, targets = self.batches[i % len(self.batches)]
        out = self.model(ids, self.state)
        scored = self.model.output.score(out, targets)
        loss = (
            scored.nll.mean()
            + scored.penalty
            + activation_reg(out.output, self.ar)
            + temporal_activation_reg(out.raw_output, self.tar)
        )
        self.state = detach_state(out.state)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = float(loss.detach())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", default="mos-awd-lstm-ptb", help="a MoS preset: model sizes, dropouts, lr, clip, AR/TAR"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's batch_size")
    parser.add_argument("--bptt", type=int, default=None, help="default: the preset's bptt")
    parser.add_argument("--experts", type=int, default=None, help="default: the preset's n_experts")
    parser.add_argument("--steps", type=int, default=50, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds the steps are split into")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's); 1 is steadier on a shared machine",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/mos-throughput-<device>.json"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--steps, --rounds and --threads must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = torch.device(args.device)
    config = build_config(args.preset)
    t = config.train
    mos_cfg = config.model
    if mos_cfg.output.kind == "softmax":
        parser.error(f"--preset {args.preset} has no mixture output layer; pick a mos-* preset")
    if args.experts is not None:
        mos_cfg = dataclasses.replace(mos_cfg, output=dataclasses.replace(mos_cfg.output, n_experts=args.experts))
    emb_size = mos_cfg.input.emb_size
    plain_output = SoftmaxConfig(tie_weights=mos_cfg.encoder.output_size(emb_size) == emb_size)
    plain_cfg = dataclasses.replace(mos_cfg, output=plain_output)
    vocab = VOCAB.get(config.data.name, 10_000)
    batch_size, bptt = args.batch_size or t.batch_size, args.bptt or t.bptt

    torch.manual_seed(args.seed)
    batches = random_batches(vocab, batch_size, bptt, args.seed, device)
    models = {"mos": LanguageModel(mos_cfg, vocab).to(device), "softmax": LanguageModel(plain_cfg, vocab).to(device)}
    steppers = {
        name: Stepper(m, batches, t.optimizer.lr, t.clip, t.optimizer.weight_decay, t.terms.ar_alpha, t.terms.tar_beta)
        for name, m in models.items()
    }
    seconds, steps_done = interleaved(steppers, args.steps, args.rounds, args.warmup, device)

    tokens = {name: steps_done[name] * batch_size * bptt for name in steppers}
    tps = {name: tokens[name] / seconds[name] for name in steppers}
    result = {
        "benchmark": "training throughput, mixture of softmaxes vs plain softmax on the same AWD-LSTM encoder",
        **environment(device, "mos_throughput.py", argv),
        "preset": args.preset,
        "model": {name: dataclasses.asdict(m.cfg) for name, m in models.items()},
        "parameters": {name: m.num_parameters() for name, m in models.items()},
        "vocab_size": vocab,
        "batch_size": batch_size,
        "bptt": bptt,
        "n_experts": mos_cfg.output.n_experts,
        "lr": t.optimizer.lr,
        "clip": t.clip,
        "ar_alpha": t.terms.ar_alpha,
        "tar_beta": t.terms.tar_beta,
        "warmup_steps": args.warmup,
        "timed_steps": steps_done,
        "rounds": args.rounds,
        "seconds": seconds,
        "tokens_per_s": tps,
        "ratio_mos_over_softmax": tps["mos"] / tps["softmax"],
        "final_loss": {name: s.last_loss for name, s in steppers.items()},
    }
    result["load_average_before_after"] = [load_before, result.pop("load_average")]
    save(result, args.out or RESULTS / f"mos-throughput-{device.type}.json")
    print(f"MoS {tps['mos']:.0f} tok/s, softmax {tps['softmax']:.0f} tok/s, ratio {tps['mos'] / tps['softmax']:.3f}")
    return result


if __name__ == "__main__":
    main()
