"""Training throughput: the regularized AWD-LSTM against a plain ``torch.nn.LSTM`` stack.

Both models have the same shapes (embedding, LSTM layers as in AWD-LSTM section 4.5, softmax
tied to the embedding) and train with the same step: forward, backward, gradient clipping,
SGD update, hidden state carried and detached. The regularized model adds everything the
AWD-LSTM recipe puts on the hot path: embedding dropout, locked dropout on input / between
layers / on the output, DropConnect on every recurrent weight (fused kernel run with the
dropped copy), and the AR/TAR terms. The plain model has none of them.

The two are measured in one process, interleaved: a warm-up, then timed rounds that alternate
which model goes first, synchronizing CUDA around every timed block. Tokens/s of each and the
ratio regularized/plain are printed and saved as JSON with device and versions.

    python benchmarks/throughput.py --preset-size ptb --device cuda --steps 100
    python benchmarks/throughput.py --preset-size ptb --device cpu --steps 6 --rounds 3
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from harness import RESULTS, environment, interleaved, random_batches, save
from torch import Tensor, nn

from reglm.config import ModelConfig
from reglm.encoders.base import StackState, detach_state
from reglm.models import LanguageModel
from reglm.objectives.activation_reg import activation_reg, temporal_activation_reg
from reglm.outputs.softmax import SoftmaxOutput

# AWD-LSTM section 5 (PTB): 3 layers, 1150 hidden, 400 embedding, dropouts (input, between
# layers, output, embedding) = (0.4, 0.3, 0.4, 0.1), weight drop 0.5, AR 2, TAR 1, batch 40,
# BPTT 70, clipping 0.25, learning rate 30, vocabulary 10,000, tied weights.
PRESETS = {
    "ptb": {
        "model": dict(
            emb_size=400,
            hidden_size=1150,
            num_layers=3,
            tie_weights=True,
            embed_dropout=0.1,
            input_dropout=0.4,
            hidden_dropout=0.3,
            output_dropout=0.4,
            weight_dropout=0.5,
            init_range=0.1,
        ),
        "vocab_size": 10_000,
        "batch_size": 40,
        "bptt": 70,
    },
    "tiny": {
        "model": dict(
            emb_size=32,
            hidden_size=64,
            num_layers=2,
            tie_weights=True,
            embed_dropout=0.1,
            input_dropout=0.4,
            hidden_dropout=0.3,
            output_dropout=0.4,
            weight_dropout=0.5,
            init_range=0.1,
        ),
        "vocab_size": 1_000,
        "batch_size": 8,
        "bptt": 20,
    },
}
AR_ALPHA, TAR_BETA, LR, CLIP, WEIGHT_DECAY = 2.0, 1.0, 30.0, 0.25, 1.2e-6
TARGET_RATIO = {"cuda": 0.90, "cpu": 0.85}


class PlainLSTMLM(nn.Module):
    """Baseline: the same embedding, a stack of ``torch.nn.LSTM`` layers, the same tied softmax."""

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        emb, hidden, n = cfg.input.emb_size, cfg.encoder.hidden_size, cfg.encoder.num_layers
        self.embedding = nn.Embedding(vocab_size, emb)
        nn.init.uniform_(self.embedding.weight, -cfg.input.init_range, cfg.input.init_range)
        sizes = zip([emb] + [hidden] * (n - 1), [hidden] * (n - 1) + [emb])
        self.lstms = nn.ModuleList(nn.LSTM(i, h, batch_first=True) for i, h in sizes)
        self.output = SoftmaxOutput(emb, vocab_size, self.embedding.weight)

    def forward(
        self, ids: Tensor, state: list[tuple[Tensor, Tensor]] | None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """``ids: (B, T)`` -> (last-layer output ``(B, T, E)``, new state)."""
        x = self.embedding(ids)
        new_state = []
        for li, lstm in enumerate(self.lstms):
            x, layer_state = lstm(x, None if state is None else state[li])
            new_state.append(layer_state)
        return x, new_state


class Trainer:
    """One model, its optimizer and its carried hidden state; :meth:`step` is one training step."""

    def __init__(self, model: nn.Module, regularized: bool) -> None:
        self.model = model.train()
        self.regularized = regularized
        self.params = list(model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.state: StackState | list[tuple[Tensor, Tensor]] | None = None
        self.last_loss: Tensor | None = None

    def step(self, ids: Tensor, targets: Tensor) -> None:
        if self.regularized:
            out = self.model(ids, self.state)
            loss = self.model.output.score(out, targets).nll.mean()
            loss = loss + activation_reg(out.output, AR_ALPHA) + temporal_activation_reg(out.raw_output, TAR_BETA)
            self.state = detach_state(out.state)
        else:
            hidden, state = self.model(ids, self.state)
            loss = self.model.output.nll_of(hidden, targets).mean()
            self.state = [(h.detach(), c.detach()) for h, c in state]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset-size", choices=sorted(PRESETS), default="ptb", help="model and batch shapes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=100, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds the steps are split into")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's (40 for ptb)")
    parser.add_argument("--bptt", type=int, default=None, help="default: the preset's (70 for ptb)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/throughput-<device>.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = torch.device(args.device)
    preset = PRESETS[args.preset_size]
    cfg = ModelConfig.build(**preset["model"])
    vocab_size = preset["vocab_size"]
    batch_size = args.batch_size or preset["batch_size"]
    bptt = args.bptt or preset["bptt"]
    out_path = args.out or RESULTS / f"throughput-{device.type}.json"

    torch.manual_seed(args.seed)
    batches = random_batches(vocab_size, batch_size, bptt, args.seed, device)

    trainers = {
        "regularized": Trainer(LanguageModel(cfg, vocab_size).to(device), regularized=True),
        "plain": Trainer(PlainLSTMLM(cfg, vocab_size).to(device), regularized=False),
    }
    steps_of = {name: (lambda i, t=t: t.step(*batches[i % len(batches)])) for name, t in trainers.items()}
    seconds, steps_done = interleaved(steps_of, args.steps, args.rounds, args.warmup, device)

    tokens = {name: steps_done[name] * batch_size * bptt for name in trainers}
    tps = {name: tokens[name] / seconds[name] for name in trainers}
    ratio = tps["regularized"] / tps["plain"]
    target = TARGET_RATIO.get(device.type)
    result = {
        "benchmark": "training throughput, regularized AWD-LSTM vs plain nn.LSTM stack",
        **environment(device, "throughput.py", argv),
        "preset_size": args.preset_size,
        "model": preset["model"],
        "vocab_size": vocab_size,
        "batch_size": batch_size,
        "bptt": bptt,
        "ar_alpha": AR_ALPHA,
        "tar_beta": TAR_BETA,
        "lr": LR,
        "clip": CLIP,
        "warmup_steps": args.warmup,
        "timed_steps": steps_done,
        "rounds": args.rounds,
        "seconds": seconds,
        "tokens_per_s": tps,
        "ratio_regularized_over_plain": ratio,
        "target_ratio": target,
        "meets_target": None if target is None else ratio >= target,
        "final_loss": {name: float(t.last_loss) for name, t in trainers.items()},
    }
    result["load_average_before_after"] = [load_before, result.pop("load_average")]
    save(result, out_path)
    return result


if __name__ == "__main__":
    main()
