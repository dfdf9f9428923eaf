"""Training throughput and model-FLOPs utilization of the Transformer body (Baevski & Auli 2019).

The body of the WikiText-103 ADP-T preset (``transformer-wt103-adp-t``: N = 16 pre-LayerNorm
blocks, e = 1024, H = 16, e_ff = 4096, dropout 0.3 / 0.1 / 0.1), built from the preset as the
trainer builds it, trained on random ``(B, T, e)`` inputs: forward, a mean-square loss on the
output (the input and output layers are measured by ``benchmarks/adaptive.py``), backward,
gradient renormalization at 0.1 and the preset's Nesterov step, under ``torch.autocast(bf16)``
with fp32 weights when ``--precision bf16`` (what ``train.precision=bf16`` does on CUDA). The
attention kernel is the fused ``scaled_dot_product_attention`` (flash attention on an H100/H200).

Reported: tokens/s, seconds per step, peak memory (CUDA: ``max_memory_allocated``) and the
model-FLOPs utilization, MFU = achieved model FLOP/s / the device's dense peak. Model FLOPs per
token follow the PaLM paper's convention (appendix B): ``6 N + 12 L T e`` for training, ``N``
the body's matrix parameters (q/k/v, output, FFN; no LayerNorm or bias), ``L`` the blocks, ``T``
the block length, ``e`` the width -- the attention term counts the full ``T x T`` score matrix,
although a causal kernel skips half of it, so that the number is comparable with published
MFUs. Dense bf16 peaks: H100 and H200 SXM 989 TFLOP/s, A100 312 (``--peak-tflops`` overrides,
e.g. for a PCIe card). The issue's target: >= 40% MFU on an H100/H200.

Runs on a CPU too, at small sizes, as a check of the script (``--dry-run``: 2 blocks of width 64,
fp32, a few steps, no MFU).

    PYTHONPATH=src python benchmarks/transformer_body.py --device cuda --precision bf16 --batch-size 16 \
        --block 512 --steps 30
    PYTHONPATH=src python benchmarks/transformer_body.py --device cuda --precision bf16 --compile
    python benchmarks/transformer_body.py --dry-run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, environment, save, sync  # noqa: E402

from reglm.config import build_config  # noqa: E402
from reglm.encoders import TransformerEncoder  # noqa: E402
from reglm.optim.optimizers import Nesterov  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts)"""

PRESET = "transformer-wt103-adp-t"
TARGET_MFU = 0.40


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def model_flops_per_token(encoder: TransformerEncoder, layers: int, block: int, width: int) -> int:
    """``6 N + 12 L T e``: ``N`` the matrix parameters of the body (PaLM's convention)."""
    matrices = sum(p.numel() for p in encoder.parameters() if p.dim() == 2)
    return 6 * matrices + 12 * layers * block * width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="bf16",
        help="bf16: autocast the forward pass (fp32 weights), as train.precision=bf16",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the body, as train.compile=true")
    parser.add_argument(
        "--batch-size", type=int, default=16, help="blocks per step (the preset: 8 per chunk, 16 chunks per update)"
    )
    parser.add_argument("--block", type=int, default=512, help="tokens per block (train.block_size)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="further preset override, repeatable (e.g. model.encoder.layers=8)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak for the precision (default: H100/H200 989, A100 312 in bf16)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="2 blocks of width 64 on the CPU, fp32, 3 steps: checks the script, measures nothing of interest",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/transformer-body-<device>.json"
    )
    args = parser.parse_args(argv)
    overrides = list(args.override)
    if args.dry_run:
        args.device, args.precision, args.steps, args.warmup, args.batch_size, args.block = "cpu", "fp32", 3, 1, 2, 32
        overrides = [
            "model.encoder.layers=2",
            "model.encoder.d_model=64",
            "model.encoder.heads=4",
            "model.encoder.ffn_dim=128",
            "model.input.dim=64",
            *overrides,
        ]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")

    config = build_config(PRESET, overrides)
    cfg = config.model.encoder
    torch.manual_seed(0)
    encoder = TransformerEncoder.from_config(cfg, cfg.d_model).to(device).train()
    optimizer = Nesterov.build(config.train.optimizer, encoder.parameters())
    forward = torch.compile(encoder) if args.compile else encoder
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch_size, args.block, cfg.d_model, device=device, generator=generator)
    target = torch.randn(args.batch_size, args.block, encoder.output_size, device=device, generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = forward(x, None).output
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), config.train.clip)
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch_size * args.block
    flops_per_token = model_flops_per_token(encoder, cfg.layers, args.block, cfg.d_model)
    achieved = flops_per_token * tokens / seconds
    peak = peak_tflops(device, args.peak_tflops)
    mfu = None if peak is None else achieved / (peak * 1e12)
    result = {
        "benchmark": "Transformer body (transformer-wt103-adp-t): training tokens/s, peak memory, model-FLOPs "
        "utilization",
        **environment(device, "benchmarks/transformer_body.py", argv),
        "preset": PRESET,
        "overrides": overrides,
        "dry_run": args.dry_run,
        "body": {
            "layers": cfg.layers,
            "d_model": cfg.d_model,
            "heads": cfg.heads,
            "ffn_dim": cfg.ffn_dim,
            "parameters": sum(p.numel() for p in encoder.parameters()),
        },
        "precision": args.precision,
        "compile": args.compile,
        "batch_size": args.batch_size,
        "block": args.block,
        "tokens_per_step": tokens,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "seconds_per_step": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "model_flops_per_token": flops_per_token,
        "flops_convention": "6 N + 12 L T e (PaLM appendix B), N = matrix parameters of the body",
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak,
        "mfu": mfu,
        "target_mfu": TARGET_MFU,
        "meets_target": None if mfu is None else mfu >= TARGET_MFU,
    }
    out = args.out or RESULTS / f"transformer-body-{device.type}{'-dry-run' if args.dry_run else ''}.json"
    if args.dry_run and args.out is None:
        print(f"dry run: {tokens / seconds:,.0f} tokens/s on {result['device_name']} (not saved)")
        return 0
    save(result, out)
    mfu_text = (
        "n/a (no known peak for this device)"
        if mfu is None
        else f"{100 * mfu:.1f}% (target >= {100 * TARGET_MFU:.0f}%)"
    )
    print(
        f"{tokens / seconds:,.0f} tokens/s, {seconds * 1e3:.1f} ms/step, {achieved / 1e12:.1f} TFLOP/s, MFU {mfu_text}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
