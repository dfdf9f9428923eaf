"""Dynamic evaluation (Krause et al. 2018) time over plain evaluation, same model and tokens.

Plain: :func:`reglm.evaluate.perplexity.evaluate` with batch size 1 and BPTT 70 (the PTB
preset's). Dynamic: :func:`reglm.evaluate.dynamic.dynamic_evaluate`, RMS rule, segment 5, batch
size 1 (the reference's settings), the gradient statistics computed beforehand; that pass is
timed on its own (batch 100 x 5 tokens, capped at ``--stats-tokens`` training tokens) and
extrapolated to the whole training split. Both passes run interleaved in one process over the
first ``--tokens`` tokens of PTB valid, on random-weight AWD-LSTMs: ``ptb`` is the PTB preset's
shape (400/1150/3, V = 10,000, tied), ``reduced`` a 200/400/3 one. Target: dynamic / plain <= 4.

A per-segment breakdown (median over ``--segments`` segments) splits the dynamic cost into
the forward alone, forward + gradient, and the weight update.

    python benchmarks/dynamic_eval.py --sizes ptb,reduced --tokens 1000 --device cpu --threads 1
    python benchmarks/dynamic_eval.py --sizes ptb --tokens 5000 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from harness import RESULTS, environment, interleaved, save, sync
from reglm.config import ModelConfig
from reglm.data import StreamPlan, resolve
from reglm.evaluate.dynamic import DynamicEvaluator, _segment_grads, dynamic_evaluate, gradient_statistics
from reglm.evaluate.dynamic_spec import DynamicSpec
from reglm.evaluate.perplexity import evaluate
from reglm.models import LanguageModel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REGULARIZATION = dict(tie_weights=True, embed_dropout=0.1, input_dropout=0.4, hidden_dropout=0.3, output_dropout=0.4, weight_dropout=0.5)
SIZES = {
    "ptb": dict(emb_size=400, hidden_size=1150, num_layers=3, **REGULARIZATION),
    "reduced": dict(emb_size=200, hidden_size=400, num_layers=3, **REGULARIZATION),
}
PLAIN_BPTT = 70
TARGET_RATIO = 4.0


def median_ms(step, n: int, device: torch.device) -> float:
    times = []
    for i in range(n):
        sync(device)
        start = time.perf_counter()
        step(i)
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def breakdown(model: LanguageModel, ids: torch.Tensor, spec: DynamicSpec, stats: dict, n: int, device: torch.device) -> dict:
    """Median milliseconds per segment: forward only, forward + gradient, and adapt (both plus
    the update), on the first ``n`` segments of ``ids``."""
    evaluator = DynamicEvaluator(model, stats, device)
    plan = StreamPlan(ids, 1, "all").to(device)
    segments = [plan.window(s, spec.segment) for s in range(0, n * spec.segment, spec.segment)]

    def forward(i: int) -> None:
        with torch.no_grad():
            w = segments[i]
            evaluator.model.output_nll(evaluator.model(w.inputs), w.targets)

    def gradient(i: int) -> None:
        _segment_grads(evaluator.model, evaluator.params, segments[i], None)

    def adapt(i: int) -> None:
        evaluator.adapt(segments[i], None, spec)

    for warm in (forward, gradient, adapt):
        warm(0)
    out = {"forward_ms": median_ms(forward, n, device), "forward_gradient_ms": median_ms(gradient, n, device), "adapt_ms": median_ms(adapt, n, device)}
    evaluator.reset()
    out["update_ms"] = out["adapt_ms"] - out["forward_gradient_ms"]
    return out


def measure(name: str, corpus, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    model = LanguageModel(ModelConfig.build(**SIZES[name]), len(corpus.vocab)).to(device)
    ids = corpus.valid[: args.tokens + 1]
    spec = DynamicSpec(segment=5, batch_size=1, variant="rms", max_train_tokens=args.stats_tokens)
    sync(device)
    start = time.perf_counter()
    stats = gradient_statistics(model, corpus.train, spec, device=device)
    sync(device)
    stats_seconds = time.perf_counter() - start
    windows = max(1, args.stats_tokens // (spec.stats_batch_size * spec.segment))
    stats_tokens = windows * spec.stats_batch_size * spec.segment
    results = {}

    def dynamic(_i: int) -> None:
        results["dynamic"] = dynamic_evaluate(model, ids, spec, stats, device)

    def plain(_i: int) -> None:
        results["plain"] = evaluate(model, ids, 1, PLAIN_BPTT, device)

    seconds, passes = interleaved({"dynamic": dynamic, "plain": plain}, args.rounds, args.rounds, args.warmup, device)
    per_pass = {k: v / passes[k] for k, v in seconds.items()}
    tokens = results["plain"].tokens
    return {
        "size": name,
        "model": SIZES[name],
        "vocab_size": len(corpus.vocab),
        "parameters": model.num_parameters(),
        "eval_tokens": tokens,
        "passes": passes,
        "seconds_per_pass": per_pass,
        "ms_per_token": {k: 1e3 * v / tokens for k, v in per_pass.items()},
        "ratio": per_pass["dynamic"] / per_pass["plain"],
        "loss": {k: r.loss for k, r in results.items()},
        "statistics_pass": {
            "train_tokens": stats_tokens,
            "seconds": stats_seconds,
            "tokens_per_second": stats_tokens / stats_seconds,
            "extrapolated_full_train_seconds": stats_seconds * corpus.train.numel() / stats_tokens,
        },
        "per_segment": breakdown(model, ids, spec, stats, args.segments, device),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="ptb,reduced", help=f"comma-separated model shapes from {sorted(SIZES)}")
    parser.add_argument("--tokens", type=int, default=1000, help="first N tokens of PTB valid to evaluate")
    parser.add_argument("--stats-tokens", type=int, default=10000, help="training tokens of the timed statistics pass")
    parser.add_argument("--segments", type=int, default=20, help="segments of the per-segment breakdown")
    parser.add_argument("--data-dir", type=Path, default=SHARED_DATA, help="directory holding ptb/ (or the download cache)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes of each before timing")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of each, alternating which goes first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/dynamic-eval-<device>.json")
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    if any(s not in SIZES for s in sizes) or args.tokens < 2 * 5 * args.segments or args.rounds < 1 or args.warmup < 0 or args.stats_tokens < 1:
        parser.error(f"--sizes from {sorted(SIZES)}; --tokens >= 10 x --segments; --rounds, --stats-tokens >= 1; --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    corpus = resolve("ptb", data_dir=str(args.data_dir))
    runs = [measure(name, corpus, args, device) for name in sizes]
    result = {
        "benchmark": "dynamic evaluation (rms, segment 5, batch 1) over plain evaluation (batch 1, BPTT 70), same random-weight model and PTB valid tokens",
        **environment(device, "dynamic_eval.py", argv),
        "warmup_passes": args.warmup,
        "rounds": args.rounds,
        "results": runs,
        "target_ratio": TARGET_RATIO,
        "meets_target": all(r["ratio"] <= TARGET_RATIO for r in runs),
    }
    save(result, args.out or RESULTS / f"dynamic-eval-{device.type}.json")
    for r in runs:
        seg = r["per_segment"]
        print(f"{r['size']:>8}: dynamic / plain = {r['ratio']:.2f} ({r['ms_per_token']['dynamic']:.2f} vs {r['ms_per_token']['plain']:.2f} ms/token); "
              f"per segment: forward {seg['forward_ms']:.1f}, forward+gradient {seg['forward_gradient_ms']:.1f}, update {seg['update_ms']:.1f} ms; "
              f"statistics {r['statistics_pass']['tokens_per_second']:.0f} tok/s")
    return result


if __name__ == "__main__":
    main()
