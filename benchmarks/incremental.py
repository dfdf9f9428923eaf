"""Throughput of the incremental API (``lm.start``, ``Hypotheses.advance``/``select``) for beam search.

A decoder with a beam of ``B`` hypotheses extends each by one word per step and then keeps,
forks or drops hypotheses. Simulated here with the AWD-LSTM PTB preset's architecture, or any
``--preset`` with model overrides that fit PTB's 10,000 words (random weights: the cost does not
depend on them), and words of PTB test: for ``--steps`` steps, every
hypothesis is advanced by its next word of the text, then the beam is reshuffled by a random
index with repeats (forks) and omissions (drops). Two contenders, interleaved in one process:

* ``batched``: one :class:`~reglm.evaluate.incremental.Hypotheses` of ``B``: one ``advance`` (one
  batched forward) and one ``select`` per step;
* ``one_at_a_time``: ``B`` hypotheses of one each, advanced one after the other, and forked by
  ``select([0])`` -- a decoder that calls the model once per hypothesis (as with a batch-of-one
  state API).

Both must give the same totals; reported: words/s of each at beam sizes 1, 8, 64 and the ratio.

    python benchmarks/incremental.py --device cpu --threads 1
    python benchmarks/incremental.py --threads 1 --preset transformer-wt2-adp-t-small \
        model.input.cutoffs=2000,6000 model.output.cutoffs=2000,6000 \
        --out benchmarks/results/incremental-transformer-cpu.json
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import torch
from harness import RESULTS, environment, interleaved, save

from reglm.api import TrainedModel
from reglm.config import build_config
from reglm.data import resolve
from reglm.evaluate.incremental import Hypotheses
from reglm.models import LanguageModel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def plan(words: list[str], beam: int, steps: int, seed: int) -> tuple[list[list[str]], list[list[int]]]:
    """Per step: each hypothesis' next word (hypothesis ``b`` reads the text from its own offset),
    and the beam's reshuffle (an index into the ``beam`` hypotheses, with repeats)."""
    rng = random.Random(seed)
    stride = len(words) // max(beam, 1)
    step_words = [[words[(b * stride + t) % len(words)] for b in range(beam)] for t in range(steps)]
    reshuffles = [sorted(rng.choices(range(beam), k=beam)) for _ in range(steps)]
    return step_words, reshuffles


def batched(lm: TrainedModel, step_words: list[list[str]], reshuffles: list[list[int]]) -> torch.Tensor:
    hyps = lm.start(len(step_words[0]))
    for words, index in zip(step_words, reshuffles):
        hyps.advance(words)
        hyps = hyps.select(index)
    return hyps.totals


def one_at_a_time(lm: TrainedModel, step_words: list[list[str]], reshuffles: list[list[int]]) -> torch.Tensor:
    beam: list[Hypotheses] = [lm.start(1) for _ in step_words[0]]
    for words, index in zip(step_words, reshuffles):
        for hyp, word in zip(beam, words):
            hyp.advance([word])
        beam = [beam[i].select([0]) for i in index]
    return torch.cat([hyp.totals for hyp in beam])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("REGLM_SHARED_DATA", SHARED_DATA)),
        help="directory holding ptb/ (default: ../shared/data)",
    )
    parser.add_argument("--preset", default="awd-lstm-ptb", help="the architecture (random weights)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="model options over the preset's")
    parser.add_argument("--beams", default="1,8,64", help="beam sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="words per hypothesis per timed run")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per contender and beam size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/incremental-<device>.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    corpus = resolve("ptb", data_dir=args.data_dir)
    words = (args.data_dir / "ptb" / "test.txt").read_text(encoding="utf-8").split()
    torch.manual_seed(args.seed)
    model = LanguageModel(build_config(args.preset, args.overrides).model, len(corpus.vocab)).to(device)
    lm = TrainedModel(model, corpus.vocab, device)
    env = environment(device, "incremental.py", argv)
    rows = {}
    for beam in (int(b) for b in args.beams.split(",")):
        step_words, reshuffles = plan(words, beam, args.steps, args.seed)
        totals: dict[str, torch.Tensor] = {}

        def run(name: str, fn):  # noqa: ANN001, ANN202
            return lambda _i: totals.__setitem__(name, fn(lm, step_words, reshuffles))

        seconds, done = interleaved(
            {"batched": run("batched", batched), "one_at_a_time": run("one_at_a_time", one_at_a_time)},
            args.rounds,
            args.rounds,
            1,
            device,
        )
        gap = float((totals["batched"] - totals["one_at_a_time"]).abs().max())
        assert gap < 1e-3, f"batching changed the scores by {gap}"
        rate = {name: beam * args.steps * done[name] / seconds[name] for name in seconds}
        rows[str(beam)] = {
            "words_per_s": rate,
            "batched_over_one_at_a_time": rate["batched"] / rate["one_at_a_time"],
            "max_abs_total_difference": gap,
        }
        print(
            f"beam {beam}: {rate['batched']:.0f} vs {rate['one_at_a_time']:.0f} words/s "
            f"({rows[str(beam)]['batched_over_one_at_a_time']:.2f}x)",
            flush=True,
        )
    result = {
        "benchmark": "incremental scoring for beam search: one batched step per beam vs one hypothesis at a time",
        **env,
        "load_average_end": os.getloadavg(),
        "model": {
            "preset": args.preset,
            "overrides": args.overrides,
            "random_weights": True,
            "vocab_size": len(corpus.vocab),
            "parameters": model.num_parameters(),
        },
        "steps_per_run": args.steps,
        "timed_runs": args.rounds,
        "beams": rows,
    }
    save(result, args.out or RESULTS / f"incremental-{device.type}.json")
    return result


if __name__ == "__main__":
    main()
