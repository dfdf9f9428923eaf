"""Training a stateless encoder (the Transformer): gradient accumulation over sentence and block
batches, the token budget, and bit-exact resume of a step-based run."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from reglm.config import build_config
from reglm.data import load_corpus
from reglm.data.sentence_plan import SentencePlan
from reglm.data.windows import Window
from reglm.metrics import read_metrics
from reglm.train.checkpoint import load_state
from reglm.train.run import Trainer, resume, train
from tests.train.test_train import _interrupt_and_resume

NO_DROPOUT = [
    "model.encoder.dropout=0",
    "model.encoder.attention_dropout=0",
    "model.encoder.relu_dropout=0",
    "model.input.dropout=0",
    "model.output.tail_dropout=0",
    "train.clip=0",
    "train.optimizer=sgd",
]


def _merged(windows: list[Window]) -> Window:
    """The windows as one batch: rows padded on the right to the longest, padding unscored."""
    width = max(w.inputs.size(1) for w in windows)

    def pad(t: torch.Tensor, value: int | bool) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.size(1)), value=value)

    scored = [torch.ones_like(w.inputs, dtype=torch.bool) if w.scored is None else w.scored for w in windows]
    return Window(
        torch.cat([pad(w.inputs, 0) for w in windows]),
        torch.cat([pad(w.targets, 0) for w in windows]),
        torch.cat([pad(s, False) for s in scored]),
        torch.cat([pad(w.positions, -1) for w in windows]),
        sum(w.tokens for w in windows),
        sum(w.words for w in windows),
    )


def _sentences(eos: int, lengths: list[int]) -> Window:
    """One batch of sentences of the given lengths (in tokens, the end of sentence included)."""
    gen = torch.Generator().manual_seed(sum(lengths))
    ids = [eos]
    for n in lengths:
        ids += [*torch.randint(5, 300, (n - 1,), generator=gen).tolist(), eos]
    plan = SentencePlan(torch.tensor(ids), eos, max_tokens=100)
    assert plan.batches == 1
    return plan.batch(0, 0)


def _step_delta(trainer: Trainer, batch: Window | list[Window]) -> dict[str, torch.Tensor]:
    model = trainer.model
    before = copy.deepcopy(model.state_dict())
    trainer.engine.step(batch, None, lr=1.0)
    delta = {k: model.state_dict()[k] - v for k, v in before.items()}
    model.load_state_dict(before)
    return delta


@pytest.mark.parametrize("batching", ["sentences", "blocks"])
def test_accumulated_batches_step_like_one_batch_holding_them_all(tmp_path: Path, batching: str) -> None:
    """update_freq windows, each its own chunk weighted by its scored targets, give the update of
    one padded batch of all their rows (the mean loss over every scored target)."""
    config = build_config(
        "transformer-tiny",
        [
            *NO_DROPOUT,
            f"train.batching={batching}",
            "train.max_tokens=96",
            "train.update_freq=3",
            "train.small_batch_size=none",
        ],
    )
    trainer = Trainer(config, tmp_path / "run", load_corpus(config), progress=False)
    windows, advance, _ = trainer.batches.next(0, 1)
    assert advance == 3 and len(windows) == 3
    if batching == "sentences":
        windows = [_sentences(trainer.vocab.eos_id, lengths) for lengths in ([3, 4], [9], [6, 5, 7])]
    accumulated = _step_delta(trainer, windows)
    merged = _step_delta(trainer, _merged(windows))
    assert any(d.abs().max() > 0 for d in accumulated.values())
    for key in accumulated:
        torch.testing.assert_close(accumulated[key], merged[key], rtol=1e-4, atol=1e-7, msg=key)


def test_padding_never_changes_the_update(tmp_path: Path) -> None:
    """A sentence batch with extra padding columns (unscored) gives the same update."""
    config = build_config(
        "transformer-tiny",
        [*NO_DROPOUT, "train.batching=sentences", "train.max_tokens=96", "train.small_batch_size=none"],
    )
    trainer = Trainer(config, tmp_path / "run", load_corpus(config), progress=False)
    window, _, _ = trainer.batches.next(0, 1)
    padded = _merged(
        [
            window,
            Window(
                window.inputs[:1, :1],
                window.targets[:1, :1],
                torch.zeros(1, 1, dtype=torch.bool),
                torch.full((1, 1), -1),
                0,
                0,
            ),
        ]
    )
    wide = Window(
        torch.nn.functional.pad(padded.inputs, (0, 5)),
        torch.nn.functional.pad(padded.targets, (0, 5)),
        torch.nn.functional.pad(padded.scored, (0, 5), value=False),
        torch.nn.functional.pad(padded.positions, (0, 5), value=-1),
        padded.tokens,
        padded.words,
    )
    plain, widened = _step_delta(trainer, window), _step_delta(trainer, wide)
    for key in plain:
        torch.testing.assert_close(plain[key], widened[key], rtol=1e-4, atol=1e-7, msg=key)


def test_sentence_batches_keep_the_token_budget_and_read_every_sentence(tmp_path: Path) -> None:
    config = build_config(
        "transformer-tiny",
        ["train.batching=sentences", "train.max_tokens=64", "train.epochs=1", "train.small_batch_size=none"],
    )
    corpus = load_corpus(config)
    trainer = Trainer(config, tmp_path / "run", corpus, progress=False)
    plan = trainer.batches.plan
    scored = 0
    for index in range(plan.batches):
        window = plan.batch(1, index)
        assert window.inputs.numel() <= 64
        scored += window.tokens
    assert scored == corpus.train.numel() - 1
    train(config, tmp_path / "trained", progress=False)
    epochs = [r for r in read_metrics(tmp_path / "trained" / "metrics.jsonl") if r["event"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["valid_ppl"] < 1001


RESUME = [
    "train.update_freq=2",
    "train.small_batch_size=none",
    "train.epochs=3",
    "train.checkpoint_interval=5",
    "train.log_interval=5",
    "data.synthetic_sentences=1200",
]


def test_a_transformer_run_resumes_bit_exactly(tmp_path: Path) -> None:
    """Blocks in a shuffled order, accumulation, Nesterov momentum and warm-up + cosine, all
    step-based: an interrupted run resumed from its mid-epoch checkpoint ends with the weights
    and metrics of an uninterrupted one."""
    reference = tmp_path / "reference"
    train(build_config("transformer-tiny", RESUME), reference, progress=False)
    assert load_state(reference / "state.pt")["stage"] == "done"
    _interrupt_and_resume(tmp_path / "run", reference, "sigint", "transformer-tiny", RESUME)


def test_max_steps_ends_the_run_and_resume_does_nothing_more(tmp_path: Path) -> None:
    config = build_config("transformer-tiny", ["train.max_steps=7", "train.epochs=50"])
    train(config, tmp_path / "run", progress=False)
    state = load_state(tmp_path / "run" / "state.pt")
    assert state["stage"] == "done" and state["step"] == 7
    before = (tmp_path / "run" / "last" / "model.safetensors").read_bytes()
    resume(tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "last" / "model.safetensors").read_bytes() == before


def test_bf16_autocasts_on_cuda_only(tmp_path: Path) -> None:
    """A CPU without bf16 units multiplies bf16 many times slower: a bf16 preset runs fp32 there."""
    config = build_config("transformer-tiny", ["train.precision=bf16"])
    trainer = Trainer(config, tmp_path / "run", load_corpus(config), progress=False)
    with trainer._autocast():
        assert not torch.is_autocast_enabled("cpu")
        out = trainer.model(torch.zeros(1, 4, dtype=torch.long))
    assert out.output.dtype == torch.float32


def test_compile_wraps_the_forward_pass_and_never_what_is_saved(tmp_path: Path) -> None:
    config = build_config("transformer-tiny", ["train.compile=true"])
    trainer = Trainer(config, tmp_path / "run", load_corpus(config), progress=False)
    assert trainer.engine.forward is not trainer.model
    assert isinstance(trainer.model, type(trainer.eval_model))
    assert not any("_orig_mod" in key for key in trainer.model.state_dict())
