"""Throughput of sentence scoring (``reglm score``, ``lm.score_batch``) on an n-best-sized job.

The first ``--sentences`` lines of PTB test, each an independent sentence read after ``<eos>``,
scored by the AWD-LSTM PTB preset's architecture (random weights: the cost does not depend on
them) three ways, interleaved in one process:

* ``one_at_a_time``: ``lm.score(s)`` per sentence -- what a loop over an n-best list did before
  batching (a batch of one per sentence);
* ``batched``: ``lm.score_batch(sentences)`` -- length-sorted, padded batches, per-word sums and
  the original order restored (what ``reglm score`` runs);
* ``ceiling``: the model's forward pass and NLL alone on the same padded batches, built
  beforehand: no encoding, no bookkeeping.

Targets: batched >= 10x one at a time, and >= 0.8x the ceiling.

    python benchmarks/score_throughput.py --device cpu
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from harness import RESULTS, environment, interleaved, save

from reglm.api import BATCH_LOGITS, TrainedModel
from reglm.config import build_config
from reglm.data import resolve
from reglm.data.sentence_plan import SentencePlan
from reglm.models import LanguageModel

TARGET_OVER_ONE = 10.0
TARGET_OF_CEILING = 0.8
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def padded_batches(
    lm: TrainedModel, sentences: list[str], batch_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The ceiling's input: ``(inputs, targets, mask)`` per batch, as ``score_batch`` forms them."""
    eos = lm.vocab.eos_id
    plan = SentencePlan.of_sentences([lm.tokens_to_ids(s.split()) + [eos] for s in sentences], eos, batch_tokens)
    return [(w.inputs.to(lm.device), w.targets.to(lm.device), w.scored.to(lm.device)) for w in plan.windows()]


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
    parser.add_argument("--preset", default="awd-lstm-ptb", help="the architecture scored (random weights)")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the sentences per contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/score-throughput-<device>.json"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    corpus = resolve("ptb", data_dir=args.data_dir)
    lines = (args.data_dir / "ptb" / "test.txt").read_text(encoding="utf-8").splitlines()[: args.sentences]
    torch.manual_seed(args.seed)
    model = LanguageModel(build_config(args.preset).model, len(corpus.vocab)).to(device)
    lm = TrainedModel(model, corpus.vocab, device)
    batch_tokens = max(256, BATCH_LOGITS // len(corpus.vocab))
    batches = padded_batches(lm, lines, batch_tokens)
    tokens = sum(len(line.split()) + 1 for line in lines)
    outputs: dict[str, object] = {}
    env = environment(device, "score_throughput.py", argv)

    def one_at_a_time(_i: int) -> None:
        outputs["one_at_a_time"] = [lm.score(s) for s in lines]

    def batched(_i: int) -> None:
        outputs["batched"] = lm.score_batch(lines)

    @torch.no_grad()
    def ceiling(_i: int) -> None:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for inputs, targets, mask in batches:
            nll = model.output.nll(model(inputs, model.init_state(inputs.size(0), device=device)), targets)
            total += (nll * mask).sum(dtype=torch.float64)
        outputs["ceiling"] = float(total)

    seconds, done = interleaved(
        {"one_at_a_time": one_at_a_time, "batched": batched, "ceiling": ceiling}, args.passes, args.passes, 1, device
    )
    per_pass = {name: seconds[name] / done[name] for name in seconds}
    total_one, total_batched = sum(outputs["one_at_a_time"]), sum(outputs["batched"])
    assert abs(total_one - total_batched) <= 1e-4 * abs(total_one), (
        f"batching changed the scores: {total_one} vs {total_batched}"
    )
    assert abs(total_batched + outputs["ceiling"]) <= 1e-4 * abs(total_batched), "the ceiling scores the same targets"
    over_one = per_pass["one_at_a_time"] / per_pass["batched"]
    of_ceiling = per_pass["ceiling"] / per_pass["batched"]
    result = {
        "benchmark": "sentence scoring throughput: batched vs one at a time vs the bare forward pass",
        **env,
        "load_average_end": os.getloadavg(),
        "model": {
            "preset": args.preset,
            "random_weights": True,
            "vocab_size": len(corpus.vocab),
            "parameters": model.num_parameters(),
        },
        "data": {
            "corpus": "ptb",
            "split": "test",
            "sentences": len(lines),
            "tokens": tokens,
            "batch_tokens": batch_tokens,
            "batches": len(batches),
        },
        "timed_passes": done,
        "seconds_per_pass": per_pass,
        "sentences_per_s": {name: len(lines) / s for name, s in per_pass.items()},
        "tokens_per_s": {name: tokens / s for name, s in per_pass.items()},
        "batched_over_one_at_a_time": over_one,
        "batched_of_ceiling": of_ceiling,
        "targets": {"batched_over_one_at_a_time": TARGET_OVER_ONE, "batched_of_ceiling": TARGET_OF_CEILING},
        "meets_targets": over_one >= TARGET_OVER_ONE and of_ceiling >= TARGET_OF_CEILING,
    }
    save(result, args.out or RESULTS / f"score-throughput-{device.type}.json")
    return result


if __name__ == "__main__":
    main()
