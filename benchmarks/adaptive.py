"""Training cost of Baevski & Auli's (2019) input / output factorizations, and our adaptive softmax against torch's.

**1. Table 3's six WikiText-103 configurations**, side by side: SM, SM-T, ASM, CNN, ADP and ADP-T,
each built from its preset (``transformer-wt103-<name>``) exactly as ``reglm params`` builds it --
``build_config(preset, overrides)`` then ``LanguageModel(config.model, V, vocab)`` -- at the
paper's vocabulary of V = 267,735 words, on a **reduced body**: by default the override
``model.encoder.layers=2`` (the paper: 16), everything else the preset's (d_model 1024, 16 heads,
FFN 4096, dropouts, tail dropout 0.2, the 512-d SM softmax, the char-CNN's seven filters and
highway, ...). With two blocks and small batches the input and output layers at V = 267,735 are
most of the model (SM: 274M of 300M parameters) and most of the step, which is what Table 3's
training times compare. The vocabulary is synthetic: ``<eos>``, ``<unk>`` and random lowercase
words of 3-12 letters (the char-CNN reads their spellings), with ids in frequency order; the
batches are i.i.d. Zipfian draws (``p(id) ~ (id + 1)^-s``, ``s = 1`` by default), so every band of
the adaptive layers gets traffic in proportion to its rank (the band shares are recorded). Every
model trains with the same step on the same batches, interleaved in one process (the harness):
forward, mean NLL (+ the output layer's penalty, 0 here), backward, gradient clipping at the
presets' 0.1, an SGD update at the presets' lr (``--optimizer nesterov`` adds the presets' 0.99
momentum and its buffer). Reported: seconds per step, the ratios to SM and CNN / ADP-T (the paper:
ADP-T 30 h / SM 57 h = 0.53, CNN 70 h / ADP-T 30 h = 2.33; our target ADP-T <= 0.6x SM), the
parameter counts (input / body / output), and peak memory.

**2. Our adaptive softmax** (``reglm.outputs.adaptive_softmax.AdaptiveSoftmax``, untied, no tail
dropout) against ``torch.nn.AdaptiveLogSoftmaxWithLoss`` (``head_bias=False``, ``div_value = k``)
with the same weights: forward (mean NLL of ``N`` Zipfian targets from fixed hidden states) and
backward, V = 267,735, cutoffs 20000,60000, k = 4, in_features 1024. Target: ours <= 1.0x torch.

``--precision bf16`` runs every forward pass under ``torch.autocast(device, bfloat16)`` (fp32
weights), as ``train.precision=bf16`` does; the softmax comparison stays fp32 on a CPU, where
torch's module fails under autocast (its ``log_softmax`` stays bf16 and ``index_copy_`` into its
fp32 output refuses it). CUDA time is taken with the device synchronized around every timed block.

**Peak memory** is what training that model alone needs beyond the runtime: its persistent bytes
(parameters, buffers, optimizer state) plus the transient peak of a training step (activations,
gradients, workspace). The transient peak is measured after the timing, one model at a time, over
``--memory-steps`` steps: on CUDA ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, less what was allocated before; on CPU the process's peak resident
set (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``, after
``malloc_trim``) less its resident set before -- page-granular and including the allocator's
slack, so an upper bound of the tensors' bytes. ``state_bytes`` (parameters + gradients +
optimizer state, counted from the tensors) is given beside it.

    python benchmarks/adaptive.py --device cpu --threads 1 --steps 8 --rounds 4 --softmax-tokens 1024 --softmax-steps 6
    python benchmarks/adaptive.py --device cuda --precision bf16 --batch-size 8 --bptt 512 --steps 40 \
        --softmax-tokens 8192
"""

from __future__ import annotations

import argparse
import os
import random
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from harness import RESULTS, PeakMemory, autocast_of, environment, interleaved, optimizer_bytes, save, tensor_bytes
from torch import Tensor, nn

from reglm.config import build_config
from reglm.data.vocab import EOS, UNK, Vocab
from reglm.models import LanguageModel
from reglm.outputs.adaptive_softmax import AdaptiveSoftmax

VOCAB = 267_735
"""The WikiText-103 vocabulary (Baevski & Auli 2019, section 4.2)."""

CONFIGS = {name: f"transformer-wt103-{name.lower()}" for name in ("SM", "SM-T", "ASM", "CNN", "ADP", "ADP-T")}

PAPER = {  # Table 3: training time (hours, one 8-GPU machine; * a modified regime for memory) and parameters
    "SM": {"train_hours": 57, "params": 476.8e6},
    "SM-T": {"train_hours": 56, "params": 339.7e6},
    "ASM": {"train_hours": 35, "params": 263.1e6},
    "CNN": {"train_hours": 70, "params": 266.3e6},
    "ADP": {"train_hours": 34, "params": 291.3e6},
    "ADP-T": {"train_hours": 30, "params": 246.9e6},
}

TARGET_ADPT_OVER_SM = 0.6
TARGET_OURS_OVER_TORCH = 1.0

# ---------------------------------------------------------------------------------------- inputs


def synthetic_vocab(size: int, seed: int) -> Vocab:
    """``<eos>``, ``<unk>`` and ``size - 2`` distinct random lowercase words of 3-12 letters, ids in
    (Zipfian) frequency order."""
    rng = random.Random(seed)
    words = [EOS, UNK]
    seen = set(words)
    while len(words) < size:
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return Vocab(words, [max(1, int(1e9 / (rank + 1))) for rank in range(size)])


def zipf_ids(count: int, vocab: int, exponent: float, generator: torch.Generator) -> Tensor:
    """``count`` i.i.d. ids with ``p(id) ~ (id + 1)^-exponent``."""
    weights = torch.arange(1, vocab + 1, dtype=torch.float64).pow_(-exponent)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def zipf_batches(
    vocab: int, batch_size: int, bptt: int, exponent: float, seed: int, device: torch.device, count: int = 4
) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches ``(inputs, targets)``, each ``(batch_size, bptt)``, targets shifted by one."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        seq = zipf_ids(batch_size * (bptt + 1), vocab, exponent, generator).view(batch_size, bptt + 1).to(device)
        batches.append((seq[:, :-1].contiguous(), seq[:, 1:].contiguous()))
    return batches


def band_shares(ids: Tensor, cutoffs: tuple[int, ...]) -> list[float]:
    """Share of ``ids`` in every band ``[0, c_1), [c_1, c_2), ..., [c_n, V)``."""
    band = torch.zeros_like(ids)
    for c in cutoffs:
        band += ids >= c
    return (torch.bincount(band.reshape(-1).cpu(), minlength=len(cutoffs) + 1).double() / ids.numel()).tolist()


# ---------------------------------------------------------------------------------------- 1. the six models


class Stepper:
    """One model trained on fixed batches: forward, mean NLL, backward, clipping, SGD; ``__call__(i)`` is step ``i``."""

    def __init__(
        self,
        model: LanguageModel,
        batches: list[tuple[Tensor, Tensor]],
        lr: float,
        momentum: float,
        clip: float,
        autocast: Callable[[], Any],
    ) -> None:
        self.model = model.train()
        self.batches = batches
        self.params = list(model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        self.clip = clip
        self.autocast = autocast
        self.last_loss: Tensor | None = None
        self.grad_bytes = 0

    def __call__(self, i: int) -> None:
        ids, targets = self.batches[i % len(self.batches)]
        with self.autocast():
            out = self.model(ids)
            scored = self.model.output.score(out, targets)
            loss = scored.nll.mean() + scored.penalty
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.grad_bytes = tensor_bytes(p.grad for p in self.params)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()

    def persistent_bytes(self) -> int:
        return tensor_bytes([*self.model.parameters(), *self.model.buffers()]) + optimizer_bytes(self.optimizer)


def measure_models(args: argparse.Namespace, device: torch.device, vocab: Vocab, probe: PeakMemory) -> dict:
    overrides = [f"model.encoder.layers={args.layers}", *args.override]
    names = [n.strip() for n in args.configs.split(",")]
    batches = zipf_batches(len(vocab), args.batch_size, args.bptt, args.zipf, args.seed, device)
    autocast = autocast_of(device, args.precision)
    steppers, info = {}, {}
    for name in names:
        preset = CONFIGS[name]
        config = build_config(preset, overrides)
        torch.manual_seed(args.seed)
        model = LanguageModel(config.model, len(vocab), vocab).to(device)
        t = config.train
        momentum = t.optimizer.momentum if args.optimizer == "nesterov" else 0.0
        steppers[name] = Stepper(model, batches, t.optimizer.lr, momentum, t.clip, autocast)
        split = model.parameter_split()
        info[name] = {
            "preset": preset,
            "overrides": overrides,
            "lr": t.optimizer.lr,
            "momentum": momentum,
            "clip": t.clip,
            "parameters": {**split, "total": model.num_parameters()},
            "paper": PAPER[name],
        }
        print(f"built {name:6s} ({preset}): {model.num_parameters() / 1e6:.1f}M parameters", flush=True)
    seconds, done = interleaved(steppers, args.steps, args.rounds, args.warmup, device)
    per_step = {name: seconds[name] / done[name] for name in names}
    for name, stepper in steppers.items():
        transient = probe.measure(lambda s=stepper: [s(i) for i in range(args.memory_steps)])
        persistent = stepper.persistent_bytes()
        info[name].update(
            {
                "timed_steps": done[name],
                "seconds_per_step": per_step[name],
                "tokens_per_s": args.batch_size * args.bptt / per_step[name],
                "final_loss": float(stepper.last_loss),
                "persistent_bytes": persistent,
                "step_transient_peak_bytes": transient,
                "peak_memory_bytes": None if transient is None else persistent + transient,
                "state_bytes": tensor_bytes(stepper.params) + stepper.grad_bytes + optimizer_bytes(stepper.optimizer),
            }
        )
    base = "SM" if "SM" in per_step else names[0]
    for name in names:
        info[name]["time_ratio_to_sm"] = per_step[name] / per_step[base]
        peak, peak_base = info[name]["peak_memory_bytes"], info[base]["peak_memory_bytes"]
        info[name]["memory_ratio_to_sm"] = None if peak is None or peak_base is None else peak / peak_base
        info[name]["paper_time_ratio_to_sm"] = PAPER[name]["train_hours"] / PAPER["SM"]["train_hours"]
    ratios: dict[str, Any] = {"time_over_sm": {n: info[n]["time_ratio_to_sm"] for n in names}}
    if "CNN" in per_step and "ADP-T" in per_step:
        ratios["time_cnn_over_adp_t"] = per_step["CNN"] / per_step["ADP-T"]
    ratios["paper_time_over_sm"] = {n: info[n]["paper_time_ratio_to_sm"] for n in names}
    ratios["paper_time_cnn_over_adp_t"] = PAPER["CNN"]["train_hours"] / PAPER["ADP-T"]["train_hours"]
    adpt = ratios["time_over_sm"].get("ADP-T") if base == "SM" else None
    return {
        "reduction": f"model.encoder.layers={args.layers} (paper 16); other overrides: {args.override or 'none'}; "
        f"batches of {args.batch_size} x {args.bptt} tokens (paper 65K tokens per update)",
        "overrides": overrides,
        "batch_size": args.batch_size,
        "bptt": args.bptt,
        "tokens_per_step": args.batch_size * args.bptt,
        "optimizer": args.optimizer,
        "band_shares_20k_60k": band_shares(torch.stack([y for _, y in batches]), (20000, 60000)),
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "memory_steps": args.memory_steps,
        "configs": info,
        "ratios": ratios,
        "target_adp_t_over_sm": TARGET_ADPT_OVER_SM,
        "meets_target": None if adpt is None else adpt <= TARGET_ADPT_OVER_SM,
    }


# ---------------------------------------------------------------------------------------- 2. adaptive softmax vs torch


class OutputStepper:
    """Forward (mean NLL of fixed hidden states) and backward of one adaptive softmax."""

    def __init__(
        self,
        loss_of: Callable[[Tensor, Tensor], Tensor],
        module: nn.Module,
        hidden: Tensor,
        targets: Tensor,
        autocast: Callable[[], Any],
    ) -> None:
        self.loss_of, self.module, self.targets, self.autocast = loss_of, module, targets, autocast
        self.hidden = hidden.requires_grad_(True)
        self.last_loss: Tensor | None = None

    def __call__(self, _i: int) -> None:
        with self.autocast():
            loss = self.loss_of(self.hidden, self.targets)
        loss.backward()
        self.last_loss = loss.detach()
        for p in self.module.parameters():
            p.grad = None
        self.hidden.grad = None


def torch_twin(ours: AdaptiveSoftmax) -> nn.AdaptiveLogSoftmaxWithLoss:
    """``torch.nn.AdaptiveLogSoftmaxWithLoss`` with ``ours``'s weights (the same function)."""
    ref = nn.AdaptiveLogSoftmaxWithLoss(
        ours.in_features, ours.vocab_size, list(ours.cutoffs), div_value=ours.dims[0] / ours.dims[1], head_bias=False
    )
    with torch.no_grad():
        ref.head.weight.copy_(torch.cat([ours.head_weight, ours.cluster_weight]))
        for j, tail in enumerate(ref.tail):
            tail[0].weight.copy_(ours.tail_projections[j].T)
            tail[1].weight.copy_(ours.tail_weights[j])
    return ref


def measure_softmax(args: argparse.Namespace, device: torch.device, probe: PeakMemory) -> dict:
    cutoffs, factor, d, n = (20000, 60000), 4.0, args.softmax_features, args.softmax_tokens
    torch.manual_seed(args.seed)
    ours = AdaptiveSoftmax(d, VOCAB, cutoffs, factor, tail_dropout=0.0).train()
    ref = torch_twin(ours).train()
    ours, ref = ours.to(device), ref.to(device)
    generator = torch.Generator().manual_seed(args.seed + 1)
    hidden = torch.randn(n, d, generator=generator).to(device)
    targets = zipf_ids(n, VOCAB, args.zipf, generator).to(device)
    # torch's module cannot run under CPU bf16 autocast (its CPU log_softmax stays bf16 and its
    # index_copy_ into an fp32 buffer fails); CUDA autocast keeps log_softmax in fp32.
    precision = args.precision if device.type == "cuda" else "fp32"
    autocast = autocast_of(device, precision)
    steppers = {
        "reglm": OutputStepper(lambda h, y: ours.nll_of(h, y).mean(), ours, hidden.clone(), targets, autocast),
        "torch": OutputStepper(lambda h, y: ref(h, y).loss, ref, hidden.clone(), targets, autocast),
    }
    seconds, done = interleaved(steppers, args.softmax_steps, args.rounds, args.warmup, device)
    per_step = {name: seconds[name] / done[name] for name in steppers}
    memory = {}
    for name, stepper in steppers.items():
        transient = probe.measure(lambda s=stepper: [s(i) for i in range(args.memory_steps)])
        persistent = tensor_bytes([*stepper.module.parameters(), stepper.hidden])
        memory[name] = {
            "persistent_bytes": persistent,
            "step_transient_peak_bytes": transient,
            "peak_memory_bytes": None if transient is None else persistent + transient,
        }
    ratio = per_step["reglm"] / per_step["torch"]
    losses = {name: float(s.last_loss) for name, s in steppers.items()}
    return {
        "vocab_size": VOCAB,
        "cutoffs": list(cutoffs),
        "div_value": factor,
        "in_features": d,
        "tokens": n,
        "precision": precision,
        "band_shares": band_shares(targets, cutoffs),
        "timed_steps": done,
        "seconds_per_step": per_step,
        "tokens_per_s": {name: n / s for name, s in per_step.items()},
        "time_ratio_reglm_over_torch": ratio,
        "memory": memory,
        "memory_ratio_reglm_over_torch": None
        if memory["torch"]["peak_memory_bytes"] is None
        else memory["reglm"]["peak_memory_bytes"] / memory["torch"]["peak_memory_bytes"],
        "loss": losses,
        "loss_abs_diff": abs(losses["reglm"] - losses["torch"]),
        "target_ratio": TARGET_OURS_OVER_TORCH,
        "meets_target": ratio <= TARGET_OURS_OVER_TORCH,
    }


# ---------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16: autocast forward passes to bfloat16 (as train.precision=bf16)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's); 1 is steadier on a shared machine",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument("--layers", type=int, default=2, help="model.encoder.layers of every preset (the paper: 16)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further preset override for every model, repeatable (e.g. model.encoder.ffn_dim=2048)",
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--bptt", type=int, default=64, help="tokens per sequence")
    parser.add_argument(
        "--optimizer",
        choices=["sgd", "nesterov"],
        default="sgd",
        help="nesterov: the presets' momentum (0.99) and its buffer",
    )
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent s of the Zipfian ids, p(id) ~ (id + 1)^-s")
    parser.add_argument("--steps", type=int, default=12, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before timing")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timed rounds the steps are split into")
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=2,
        help="steps per contender over which the peak memory is taken, after the timing",
    )
    parser.add_argument("--softmax-tokens", type=int, default=2048, help="N, tokens per adaptive-softmax step")
    parser.add_argument(
        "--softmax-features",
        type=int,
        default=1024,
        help="in_features of the adaptive-softmax comparison (d; must be divisible by 16)",
    )
    parser.add_argument(
        "--softmax-steps",
        type=int,
        default=12,
        help="timed adaptive-softmax steps per contender (0: skip the comparison)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/adaptive-<device>.json")
    args = parser.parse_args(argv)
    if (
        min(args.steps, args.rounds, args.memory_steps, args.layers, args.batch_size, args.bptt) < 1
        or args.warmup < 0
        or args.softmax_steps < 0
    ):
        parser.error(
            "--steps, --rounds, --memory-steps, --layers, --batch-size and --bptt must be >= 1, --warmup and "
            "--softmax-steps >= 0"
        )
    unknown = [n for n in args.configs.split(",") if n.strip() not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {','.join(CONFIGS)}")
    if args.softmax_features % 16:
        parser.error("--softmax-features must be divisible by 16 (bands of d, d/4, d/16)")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    device = torch.device(args.device)
    probe = PeakMemory(device)
    vocab = synthetic_vocab(VOCAB, args.seed)
    training = measure_models(args, device, vocab, probe)
    softmax = measure_softmax(args, device, probe) if args.softmax_steps > 0 else None
    result: dict[str, Any] = {
        "benchmark": "Baevski & Auli 2019 Table 3 factorizations (SM..ADP-T) at V=267,735 on a reduced body; our "
        "adaptive softmax vs torch's",
        **environment(device, "adaptive.py", argv),
        "precision": args.precision,
        "vocab_size": VOCAB,
        "vocabulary": "synthetic: <eos>, <unk>, random lowercase words of 3-12 letters; ids in frequency order",
        "zipf_exponent": args.zipf,
        "memory_method": probe.method,
        "state_bytes_method": "parameters + gradients (after the last step, before zero_grad) + optimizer state, "
        "tensor bytes",
        "training_step": training,
    }
    if softmax is not None:
        result["adaptive_softmax"] = softmax
    result["load_average_before_after"] = [load_before, result.pop("load_average")]
    save(result, args.out or RESULTS / f"adaptive-{device.type}.json")

    steps = result["training_step"]
    print(f"{'config':6s} {'params':>8s} {'s/step':>8s} {'x SM':>6s} {'paper':>6s} {'peak MiB':>9s}")
    for name, c in steps["configs"].items():
        peak = c["peak_memory_bytes"]
        print(
            f"{name:6s} {c['parameters']['total'] / 1e6:7.1f}M {c['seconds_per_step']:8.4f} "
            f"{c['time_ratio_to_sm']:6.3f} {c['paper_time_ratio_to_sm']:6.3f} "
            f"{'-' if peak is None else f'{peak / 2**20:9.0f}'}"
        )
    if "time_cnn_over_adp_t" in steps["ratios"]:
        print(
            f"CNN / ADP-T: {steps['ratios']['time_cnn_over_adp_t']:.2f}x (paper "
            f"{steps['ratios']['paper_time_cnn_over_adp_t']:.2f}x)"
        )
    if "adaptive_softmax" in result:
        a = result["adaptive_softmax"]
        print(
            f"adaptive softmax fwd+bwd, N={a['tokens']}: reglm {a['seconds_per_step']['reglm']:.4f} s, torch "
            f"{a['seconds_per_step']['torch']:.4f} s, "
            f"ratio {a['time_ratio_reglm_over_torch']:.3f} (loss diff {a['loss_abs_diff']:.2e})"
        )
    return result


if __name__ == "__main__":
    main()
