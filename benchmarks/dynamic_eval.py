"""Dynamic evaluation (Krause et al. 2018): reglm against a minimal hand-written loop of the same
math, and against plain evaluation, on the same model and tokens.

Contenders, each a full pass over the first ``--tokens`` tokens of PTB valid, in interleaved
rounds (A B C, C B A, ...):

* ``dynamic``: :func:`reglm.evaluate.dynamic.dynamic_evaluate`, RMS rule, one stream, segments of
  ``--segment`` tokens (the reference's 5), gradient statistics computed beforehand;
* ``minimal``: the same math written out by hand (:class:`MinimalLoop`): ``F.embedding``, one
  ``torch.lstm`` call per layer in training mode, the tied softmax, ``torch.autograd.grad`` and
  the two multi-tensor updates, with PyTorch's default CPU kernel (oneDNN) and with oneDNN off
  (``minimal-native``); the faster of the two is the baseline of ``reglm / minimal``;
* ``plain``: :func:`reglm.evaluate.perplexity.evaluate`, one stream, BPTT 70 (the PTB preset's).

Then a per-phase breakdown (median milliseconds per segment over ``--segments`` segments,
contenders interleaved segment by segment): forward (with the graph), backward
(``torch.autograd.grad``), update -- for reglm, both minimal loops, and the minimal loop adapting
fewer parameters (``minimal-last``: only the last LSTM layer and the tied softmax; the layers
below run without gradients). ``--segment`` lengths may be a list (``5,20``) to measure how
longer segments amortize the per-segment costs.

Models: random-weight AWD-LSTMs, ``ptb`` the PTB preset's shape (400/1150/3, V = 10,000, tied),
``reduced`` a 200/400/3 one. Targets: reglm / minimal <= 1.1; dynamic / plain <= 8 at segment 5
for ``ptb``. The statistics pass (batch 100 x 5) is timed on its own on ``--stats-tokens``
training tokens.

    python benchmarks/dynamic_eval.py --sizes ptb --tokens 500 --segment 5,20 --threads 1
    python benchmarks/dynamic_eval.py --sizes ptb --tokens 2000 --rounds 2 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import RESULTS, environment, interleaved, save, sync

from reglm.config import ModelConfig
from reglm.data import StreamPlan, resolve
from reglm.encoders.base import detach_state
from reglm.evaluate.dynamic import (
    DynamicEvaluator,
    dynamic_evaluate,
    gradient_statistics,
    segment_gradients,
    segment_loss,
)
from reglm.evaluate.dynamic_spec import DynamicSpec
from reglm.evaluate.perplexity import evaluate
from reglm.models import LanguageModel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REGULARIZATION = dict(
    tie_weights=True, embed_dropout=0.1, input_dropout=0.4, hidden_dropout=0.3, output_dropout=0.4, weight_dropout=0.5
)
SIZES = {
    "ptb": dict(emb_size=400, hidden_size=1150, num_layers=3, **REGULARIZATION),
    "reduced": dict(emb_size=200, hidden_size=400, num_layers=3, **REGULARIZATION),
}
PLAIN_BPTT = 70
TARGET_MINIMAL = 1.1
TARGET_PLAIN = 8.0


class MinimalLoop:
    """Dynamic evaluation by hand on a copy of a tied AWD-LSTM ``model``: the reference's math
    with nothing but ``torch.lstm``, autograd and two ``torch._foreach_*`` updates. ``native``:
    oneDNN off around the LSTM calls. ``adapt="last"`` adapts only the last LSTM layer and the
    tied softmax (weight and bias); the layers below run without gradients."""

    def __init__(self, model: LanguageModel, stats: dict, spec: DynamicSpec, native: bool, adapt: str = "all") -> None:
        work = copy.deepcopy(model)
        self.device = work.embedding.weight.device
        self.weight, self.bias = work.embedding.weight, work.output.bias
        self.layers = [[m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0] for m in work.encoder.layers]
        self.native, self.spec, self.adapt = native, spec, adapt
        named = dict(work.named_parameters())
        if adapt == "all":
            names = list(named)
        else:
            last = len(self.layers) - 1
            names = [
                n for n in named if n.startswith(f"encoder.layers.{last}.") or n.startswith(("embedding.", "output."))
            ]
        self.params = [named[n] for n in names]
        self.theta0 = [p.detach().clone() for p in self.params]
        rms = [stats[n] for n in named]
        mean = torch.stack([r.mean() for r in rms]).mean()
        self.decay = [(spec.lam * stats[n] / mean).clamp(max=1.0) for n in names]
        self.step = [(stats[n] + spec.eps).reciprocal().mul(spec.lr) for n in names]
        for p in named.values():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)

    def init_state(self) -> list:
        return [
            (torch.zeros(1, 1, p[1].size(1), device=self.device), torch.zeros(1, 1, p[1].size(1), device=self.device))
            for p in self.layers
        ]

    def forward(self, x: torch.Tensor, y: torch.Tensor, state: list) -> tuple[torch.Tensor, torch.Tensor, list]:
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = not self.native
        try:
            h = F.embedding(x, self.weight)
            new_state = []
            for i, params in enumerate(self.layers):
                lower = self.adapt == "last" and i < len(self.layers) - 1
                with torch.set_grad_enabled(not lower):
                    h, hn, cn = torch.lstm(h, state[i], params, True, 1, 0.0, True, False, True)
                new_state.append((hn.detach(), cn.detach()))
            nll = F.cross_entropy(
                F.linear(h, self.weight, self.bias).view(-1, self.weight.size(0)), y.reshape(-1), reduction="none"
            )
        finally:
            torch.backends.mkldnn.enabled = previous
        return nll, nll.mean(), new_state

    def backward(self, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
        previous = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = not self.native
        try:
            return torch.autograd.grad(loss, self.params)
        finally:
            torch.backends.mkldnn.enabled = previous

    @torch.no_grad()
    def update(self, grads: tuple[torch.Tensor, ...]) -> None:
        torch._foreach_lerp_(self.params, self.theta0, self.decay)
        torch._foreach_addcmul_(self.params, grads, self.step, value=-1.0)

    @torch.no_grad()
    def reset(self) -> None:
        torch._foreach_copy_(self.params, self.theta0)

    def evaluate(self, ids: torch.Tensor) -> float:
        """One pass over ``ids`` (one stream); the mean NLL. The weights are reset afterwards."""
        state, total, count = self.init_state(), 0.0, 0
        for start in range(0, ids.numel() - 1, self.spec.segment):
            x = ids[None, start : start + self.spec.segment]
            y = ids[None, start + 1 : start + 1 + x.size(1)]
            x = x[:, : y.size(1)]
            nll, loss, state = self.forward(x, y, state)
            self.update(self.backward(loss))
            total += float(nll.detach().sum())
            count += y.numel()
        self.reset()
        return total / count


def ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def breakdown(
    model: LanguageModel,
    stats: dict,
    output_stats: dict,
    spec: DynamicSpec,
    ids: torch.Tensor,
    n: int,
    device: torch.device,
) -> dict:
    """Median milliseconds per segment of each phase, every contender on the same ``n`` segments
    (state carried), interleaved segment by segment; ``reglm-output`` is reglm with
    ``adapt=output`` (``output_stats`` its statistics). ``plain`` is plain evaluation timed in the
    same loop: one BPTT-70 window per segment (gradient-free, state carried), its time scaled to
    the segment's tokens, so ``ratio_to_plain`` compares costs measured side by side."""
    output_spec = dataclasses.replace(spec, adapt="output")
    evaluators = {
        "reglm": (DynamicEvaluator(model, stats, device), spec),
        "reglm-output": (DynamicEvaluator(model, output_stats, device, "output"), output_spec),
    }
    loops = {
        name: MinimalLoop(model, stats, spec, native, adapt)
        for name, native, adapt in (
            ("minimal", False, "all"),
            ("minimal-native", True, "all"),
            ("minimal-last", True, "last"),
        )
    }
    plain_model = copy.deepcopy(model).eval()
    plan = StreamPlan(ids, 1, "all").to(device)
    windows = [plan.window(s, spec.segment) for s in range(0, (n + 1) * spec.segment, spec.segment)]
    plain_windows = [
        plan.window(s % (plan.columns - PLAIN_BPTT), PLAIN_BPTT) for s in range(0, (n + 1) * PLAIN_BPTT, PLAIN_BPTT)
    ]
    times = {name: {"forward": [], "backward": [], "update": []} for name in [*evaluators, *loops]}
    times["plain"] = {"forward": []}
    states = {name: None for name in [*evaluators, "plain"]}
    states.update({name: loop.init_state() for name, loop in loops.items()})
    order = list(times)
    for i, w in enumerate(windows):
        for name in order if i % 2 == 0 else order[::-1]:
            sync(device)
            t0 = time.perf_counter()
            if name == "plain":
                with torch.no_grad():
                    out = plain_model(plain_windows[i].inputs, states[name])
                    plain_model.output.nll(out, plain_windows[i].targets)
                states[name] = out.state
                sync(device)
                if i > 0:
                    times[name]["forward"].append((time.perf_counter() - t0) * spec.segment / PLAIN_BPTT)
                continue
            if name in evaluators:
                evaluator, its_spec = evaluators[name]
                _, loss, state = segment_loss(evaluator.model, w, states[name], encoder_grad=its_spec.adapt == "all")
                sync(device)
                t1 = time.perf_counter()
                grads = segment_gradients(loss, evaluator.params)
                sync(device)
                t2 = time.perf_counter()
                evaluator.update(grads, its_spec)
                states[name] = detach_state(state)
            else:
                loop = loops[name]
                _, loss, states[name] = loop.forward(w.inputs, w.targets, states[name])
                sync(device)
                t1 = time.perf_counter()
                grads = loop.backward(loss)
                sync(device)
                t2 = time.perf_counter()
                loop.update(grads)
            sync(device)
            t3 = time.perf_counter()
            if i > 0:
                for phase, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("update", t3 - t2)):
                    times[name][phase].append(seconds)
    out = {}
    for name, phases in times.items():
        row = {f"{phase}_ms": ms(v) for phase, v in phases.items()}
        row["total_ms"] = ms([sum(parts) for parts in zip(*phases.values())])
        out[name] = row
    adapted = {name: evaluator.params for name, (evaluator, _) in evaluators.items()}
    adapted.update({name: loop.params for name, loop in loops.items()})
    out["adapted_parameters"] = {name: sum(p.numel() for p in params) for name, params in adapted.items()}
    out["ratio_to_plain"] = {name: out[name]["total_ms"] / out["plain"]["total_ms"] for name in [*evaluators, *loops]}
    return out


def measure(name: str, corpus, segment: int, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    model = LanguageModel(ModelConfig.build(**SIZES[name]), len(corpus.vocab)).to(device)
    ids = corpus.valid[: args.tokens + 1].long()
    spec = DynamicSpec(segment=segment, batch_size=1, variant="rms", max_train_tokens=args.stats_tokens)
    start = time.perf_counter()
    stats = gradient_statistics(model, corpus.train, spec, bptt=5, device=device)
    sync(device)
    stats_seconds = time.perf_counter() - start
    stats_tokens = max(1, args.stats_tokens // (spec.stats_batch_size * 5)) * spec.stats_batch_size * 5
    output_stats = gradient_statistics(
        model, corpus.train, dataclasses.replace(spec, adapt="output"), bptt=5, device=device
    )
    per_segment = breakdown(model, stats, output_stats, spec, ids, args.segments, device)
    head = {
        "size": name,
        "segment": segment,
        "model": SIZES[name],
        "vocab_size": len(corpus.vocab),
        "parameters": model.num_parameters(),
    }
    if args.breakdown_only:
        return {**head, "per_segment": per_segment}
    loops = {
        "minimal": MinimalLoop(model, stats, spec, native=False),
        "minimal-native": MinimalLoop(model, stats, spec, native=True),
    }
    results = {}

    def dynamic(_i: int) -> None:
        results["dynamic"] = dynamic_evaluate(model, ids, spec, stats, device).loss

    def plain(_i: int) -> None:
        results["plain"] = evaluate(model, ids, 1, PLAIN_BPTT, device).loss

    def minimal(key: str):
        def run(_i: int) -> None:
            results[key] = loops[key].evaluate(ids.to(device))

        return run

    contenders = {
        "dynamic": dynamic,
        "minimal": minimal("minimal"),
        "minimal-native": minimal("minimal-native"),
        "plain": plain,
    }
    seconds, passes = interleaved(contenders, args.rounds, args.rounds, args.warmup, device)
    per_pass = {k: v / passes[k] for k, v in seconds.items()}
    tokens = ids.numel() - 1
    baseline = min(("minimal", "minimal-native"), key=per_pass.get)
    return {
        **head,
        "eval_tokens": tokens,
        "passes": passes,
        "seconds_per_pass": per_pass,
        "ms_per_token": {k: 1e3 * v / tokens for k, v in per_pass.items()},
        "minimal_baseline": baseline,
        "ratio_to_minimal": per_pass["dynamic"] / per_pass[baseline],
        "ratio_to_plain": per_pass["dynamic"] / per_pass["plain"],
        "loss": results,
        "statistics_pass": {
            "train_tokens": stats_tokens,
            "seconds": stats_seconds,
            "tokens_per_second": stats_tokens / stats_seconds,
        },
        "per_segment": per_segment,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="ptb", help=f"comma-separated model shapes from {sorted(SIZES)}")
    parser.add_argument("--segment", default="5", help="comma-separated segment lengths (the reference's: 5)")
    parser.add_argument("--tokens", type=int, default=500, help="first N tokens of PTB valid to evaluate")
    parser.add_argument("--stats-tokens", type=int, default=5000, help="training tokens of the timed statistics pass")
    parser.add_argument("--segments", type=int, default=20, help="segments of the per-phase breakdown")
    parser.add_argument(
        "--data-dir", type=Path, default=SHARED_DATA, help="directory holding ptb/ (or the download cache)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of each before timing")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of each, alternating the order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown-only", action="store_true", help="only the per-phase breakdown, no full passes")
    parser.add_argument("--note", default=None, help="free text stored with the result (e.g. the machine's load)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/dynamic-eval-<device>.json")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    segments = [int(s) for s in args.segment.split(",")]
    if (
        any(s not in SIZES for s in sizes)
        or min(segments) < 1
        or args.tokens < max(segments) * (args.segments + 2)
        or args.rounds < 1
        or args.warmup < 0
    ):
        parser.error(
            f"--sizes from {sorted(SIZES)}; --segment >= 1; --tokens >= segment x (--segments + 2); "
            "--rounds >= 1; --warmup >= 0"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    corpus = resolve("ptb", data_dir=str(args.data_dir))
    runs = [measure(name, corpus, segment, args, device) for name in sizes for segment in segments]
    result = {
        "benchmark": "dynamic evaluation (rms, batch 1) against a minimal hand-written loop of the same math and "
        "plain evaluation (batch 1, BPTT 70), same random-weight model and PTB valid tokens",
        **environment(device, "dynamic_eval.py", argv),
        "note": args.note,
        "warmup_passes": args.warmup,
        "rounds": args.rounds,
        "results": runs,
        "targets": {"ratio_to_minimal": TARGET_MINIMAL, "ratio_to_plain_at_segment_5_ptb": TARGET_PLAIN},
    }
    save(result, args.out or RESULTS / f"dynamic-eval-{device.type}.json")
    for r in runs:
        seg = r["per_segment"]
        if not args.breakdown_only:
            print(
                f"{r['size']:>8} segment {r['segment']}: dynamic / minimal ({r['minimal_baseline']}) = "
                f"{r['ratio_to_minimal']:.2f}, dynamic / plain = {r['ratio_to_plain']:.2f}"
            )
        for name in ("reglm", "reglm-output", "minimal", "minimal-native", "minimal-last"):
            s = seg[name]
            print(
                f"    {name:>15}: forward {s['forward_ms']:.1f}, backward {s['backward_ms']:.1f}, "
                f"update {s['update_ms']:.1f}, total {s['total_ms']:.1f} ms/segment = "
                f"{seg['ratio_to_plain'][name]:.2f} x plain ({seg['plain']['total_ms']:.1f} ms for the same tokens)"
            )
    return result


if __name__ == "__main__":
    main()
