"""Streaming latency of an exported model: one token in, log-probabilities and the state out.

For each model size, the same random-weight model is run token by token (batch 1, the state
carried from call to call) by seven contenders in one process, in interleaved rounds whose order
alternates:

* ``pytorch``: the trained reglm model (``LanguageModel``, eval mode, ``no_grad``) -- the reference;
  a one-token call runs on the kernel :func:`reglm.encoders.fused_lstm.lstm_kernel` picks;
* ``pytorch-onednn``: the same model with every LSTM call on oneDNN (PyTorch's default CPU kernel);
* ``pytorch-inference``: the inference module rebuilt from it (:mod:`reglm.export.modules`), eager;
* ``torchscript``, ``torchscript-int8``: the exported TorchScript module, float32 and int8;
* ``onnxruntime``, ``onnxruntime-int8``: the exported ONNX graph in ONNX Runtime, float32 and int8.

Each call is timed on its own (``time.perf_counter``); the result is the median over
``--steps`` calls per contender and its ratios to ``pytorch`` and to ``onnxruntime`` (target:
``pytorch`` <= 1.3x ``onnxruntime``). Threads: ``--threads`` for PyTorch
(``torch.set_num_threads``) and for ONNX Runtime (``intra_op_num_threads``) alike.

``--kernels`` adds the measurement behind :data:`reglm.encoders.fused_lstm.CELL_MAX_STEPS`: the
LSTM stack of each size over ``B x T`` inputs, gradient-free, on the step-by-step cell against
oneDNN, interleaved, median of ``--kernel-repeats`` calls each.

Sizes: ``ptb`` is the AWD-LSTM PTB preset's shape (400 / 1150 / 3 layers, V = 10,000, tied),
``vd-medium`` Zaremba et al.'s medium VD-LSTM (650 x 2, V = 10,000, untied).

    python benchmarks/export_latency.py --threads 1 --kernels
    python benchmarks/export_latency.py --dry-run --out /tmp/latency.json   # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import RESULTS, environment, save

import reglm.encoders.fused_lstm as fused_lstm
from reglm.config import ModelConfig
from reglm.encoders.lstm_segment import cell_lstm
from reglm.export import onnx, torchscript
from reglm.export.modules import inference_module
from reglm.export.quantize import quantize_module
from reglm.models import LanguageModel

VOCAB = 10_000
SIZES = {
    "ptb": dict(emb_size=400, hidden_size=1150, num_layers=3, tie_weights=True),
    "vd-medium": dict(encoder="vd-lstm", emb_size=650, hidden_size=650, num_layers=2, tie_weights=False),
}
DRY_SIZES = {"tiny": dict(emb_size=16, hidden_size=24, num_layers=2, tie_weights=True)}
DRY_VOCAB = 100
TARGET = 1.3
"""PyTorch float32 per token over ONNX Runtime float32 per token."""
SWEEP = [(1, 1), (1, 2), (1, 4), (1, 8), (1, 16), (1, 32), (1, 70), (8, 1), (8, 8), (8, 16), (32, 4), (32, 16)]


def contenders(model: LanguageModel, threads: int) -> dict:
    """``name -> (step(tokens, state) -> (log_probs, state), zero state of one stream)``."""
    module = inference_module(model)
    zero = module.initial_state(1)

    def reference(tokens, state):
        out = model(tokens, state)
        return model.output.predict(out), out.state

    def onednn(tokens, state):
        longest, fused_lstm.CELL_MAX_STEPS = fused_lstm.CELL_MAX_STEPS, 0
        try:
            return reference(tokens, state)
        finally:
            fused_lstm.CELL_MAX_STEPS = longest

    with tempfile.TemporaryDirectory() as work:
        float32 = onnx.export_bytes(module)
        int8 = onnx.quantize(float32, Path(work))
    return {
        "pytorch": (reference, model.init_state(1)),
        "pytorch-onednn": (onednn, model.init_state(1)),
        "pytorch-inference": (module, zero),
        "torchscript": (torchscript.runner(torchscript.export_bytes(module)), zero),
        "torchscript-int8": (torchscript.runner(torchscript.export_bytes(quantize_module(module))), zero),
        "onnxruntime": (onnx.runner(float32, threads), zero),
        "onnxruntime-int8": (onnx.runner(int8, threads), zero),
    }


@torch.no_grad()
def measure(name: str, config: dict, vocab: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = LanguageModel(ModelConfig.build(**config), vocab).eval()
    runs = contenders(model, args.threads)
    tokens = torch.randint(
        0, vocab, (args.warmup + args.steps, 1, 1), generator=torch.Generator().manual_seed(args.seed)
    )
    states = {k: state for k, (_, state) in runs.items()}
    for k, (step, _) in runs.items():
        for i in range(args.warmup):
            states[k] = step(tokens[i], states[k])[1]
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    per_round = -(-args.steps // args.rounds)
    for r in range(args.rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            step = runs[k][0]
            for i in range(len(times[k]), min(args.steps, len(times[k]) + per_round)):
                start = time.perf_counter()
                states[k] = step(tokens[args.warmup + i], states[k])[1]
                times[k].append(time.perf_counter() - start)
    median_ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "size": name,
        "model": config,
        "vocab_size": vocab,
        "parameters": model.num_parameters(),
        "steps_per_contender": {k: len(v) for k, v in times.items()},
        "median_ms_per_token": median_ms,
        "ratio_to_pytorch": {k: v / median_ms["pytorch"] for k, v in median_ms.items()},
        "ratio_to_onnxruntime": {k: v / median_ms["onnxruntime"] for k, v in median_ms.items()},
        "meets_target": median_ms["pytorch"] <= TARGET * median_ms["onnxruntime"],
        **({"kernels": kernel_sweep(model, args)} if args.kernels else {}),
    }


@torch.no_grad()
def kernel_sweep(model: LanguageModel, args: argparse.Namespace) -> list[dict]:
    """The model's LSTM layers over random ``(B, T, I)`` inputs: median ms of the step-by-step
    cell and of oneDNN (``torch.lstm``), interleaved, for every ``(B, T)`` of ``SWEEP``."""
    layers = [[m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0, m.bias_hh_l0] for m in model.encoder.layers]

    def stack(x: torch.Tensor, cell: bool) -> None:
        for params in layers:
            zeros = torch.zeros(1, x.size(0), params[1].size(1))
            if cell:
                x = cell_lstm(x, (zeros, zeros), params)[0]
            else:
                x = torch.lstm(x, (zeros, zeros), params, True, 1, 0.0, False, False, True)[0]

    rows = []
    for batch, steps in SWEEP:
        x = torch.randn(batch, steps, layers[0][0].size(1))
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.kernel_repeats + 1):
            for cell in (True, False) if r % 2 == 0 else (False, True):
                start = time.perf_counter()
                stack(x, cell)
                if r > 0:
                    times[cell].append(time.perf_counter() - start)
        cell_ms, onednn_ms = (1e3 * statistics.median(times[k]) for k in (True, False))
        rows.append(
            {
                "batch": batch,
                "steps": steps,
                "cell_ms": cell_ms,
                "onednn_ms": onednn_ms,
                "cell_over_onednn": cell_ms / onednn_ms,
                "chosen": "cell" if steps <= fused_lstm.CELL_MAX_STEPS else "onednn",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--steps", type=int, default=500, help="timed calls per contender")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernels", action="store_true", help="also time the LSTM stack on the cell and on oneDNN")
    parser.add_argument("--kernel-repeats", type=int, default=6)
    parser.add_argument("--note", default=None, help="free text stored with the result (e.g. the machine's load)")
    parser.add_argument(
        "--dry-run", action="store_true", help="a tiny model and few steps: checks that the script runs"
    )
    parser.add_argument("--out", type=Path, help="result file (default: benchmarks/results/export-latency-cpu.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.dry_run:
        sizes, vocab, args.steps, args.rounds, args.warmup = DRY_SIZES, DRY_VOCAB, 20, 2, 2
    else:
        sizes, vocab = {name: SIZES[name] for name in args.sizes.split(",")}, VOCAB
    from importlib.metadata import version

    result = {
        "benchmark": "export_latency",
        "what": "median latency of one streamed token (batch 1, state carried), each contender timed per call, "
        "interleaved rounds",
        **environment(torch.device("cpu"), "benchmarks/export_latency.py", argv),
        "onnxruntime_version": version("onnxruntime"),
        "threads": args.threads,
        "cell_max_steps": fused_lstm.CELL_MAX_STEPS,
        "note": args.note,
        "results": [measure(name, config, vocab, args) for name, config in sizes.items()],
    }
    save(result, args.out or RESULTS / "export-latency-cpu.json")


if __name__ == "__main__":
    main()
