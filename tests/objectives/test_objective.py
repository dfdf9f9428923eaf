"""Training objectives end to end: discriminator training and reverse-KL / cross-entropy
fine-tuning (Popov & Kudinov 2019) through the trainer and the CLI, their resume, their errors;
the learning-rate schedules and the sequence-summed loss of the VD-LSTM recipes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reglm.cli import main
from reglm.config import build_config, derive_config
from reglm.data import load_corpus
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import Reading
from reglm.metrics import read_metrics
from reglm.modeldir import load_model_dir
from reglm.objectives.objective import score_split
from reglm.objectives.reverse_kl import discriminator_loss
from reglm.train.run import Trainer, resume, train


class Stop(Exception):
    """Raised by a step hook to cut a run short."""


def stop_after(step: int):
    def hook(trainer: Trainer) -> None:
        if trainer.step == step:
            raise Stop

    return hook


SMALL = ["data.synthetic_sentences=300", "train.epochs=1", "train.finetune=false", "train.log_interval=5"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("lm") / "lm"
    train(build_config("tiny", SMALL), run, progress=False)
    return run


@pytest.fixture(scope="module")
def disc_run(lm_run: Path) -> Path:
    out = lm_run.parent / "disc"
    assert main(["train-discriminator", str(lm_run), "--out", str(out), "train.epochs=2"]) == 0
    return out


def _epochs(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "epoch"]


def test_discriminator_run_reports_eq6_and_its_parts(disc_run: Path, lm_run: Path) -> None:
    epochs = _epochs(disc_run)
    assert len(epochs) == 2
    for record in epochs:
        assert math.isclose(record["valid_loss"], record["valid_loss_q"] + record["valid_loss_p"], rel_tol=1e-6)
    model, config, _ = load_model_dir(disc_run / "best")
    assert config.objective.kind == "discriminator"
    assert config.objective.base_model == str((lm_run / "best").resolve())
    assert config.train.optimizer.lr == 1.0 and config.train.clip == 0.25 and config.preset == "discriminator"


def test_discriminator_validation_equals_a_direct_computation(disc_run: Path, lm_run: Path) -> None:
    """score_split's mean of eq. (6) equals running both models over the whole split at once."""
    disc, config, _ = load_model_dir(disc_run / "best")
    q0, _, _ = load_model_dir(lm_run / "best")
    corpus = load_corpus(config)
    ids = corpus.valid[:400]
    disc.eval(), q0.eval()

    def per_token(outs, window):
        return {
            "loss": discriminator_loss(disc.output.full_logits(outs[0]), q0.output.predict(outs[1]), window.targets)
        }

    got = score_split([disc, q0], ids, Reading(batch_size=1, bptt=7), "cpu", per_token)
    with torch.no_grad():
        x, y = ids[:-1].unsqueeze(0), ids[1:].unsqueeze(0)
        direct = discriminator_loss(disc.output.full_logits(disc(x)), q0.output.predict(q0(x)), y).mean()
    assert got["tokens"] == 399
    assert got["loss"] == pytest.approx(float(direct), rel=1e-5)


def test_reverse_kl_finetuning_starts_from_q0_and_reports_table2_columns(
    disc_run: Path, lm_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ft"
    assert main(["finetune", str(lm_run), "--discriminator", str(disc_run), "--out", str(out), "train.epochs=1"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    initial = [r for r in records if r["event"] == "initial"]
    assert len(initial) == 1
    base_ppl = [r for r in read_metrics(lm_run / "metrics.jsonl") if r["event"] == "final"][0]["valid_ppl"]
    assert initial[0]["valid_ppl"] == pytest.approx(base_ppl, rel=1e-6)
    epoch = _epochs(out)[0]
    assert epoch["valid_loss"] == pytest.approx(epoch["valid_nll"] + epoch["valid_rev_kl"])
    assert epoch["valid_ppl"] == pytest.approx(math.exp(epoch["valid_nll"]))
    tuned, config, _ = load_model_dir(out / "best")
    assert config.objective.kind == "reverse-kl" and config.objective.discriminator == str(
        (disc_run / "best").resolve()
    )
    with torch.no_grad():
        log_probs, _ = tuned.eval().log_probs(torch.randint(0, tuned.vocab_size, (2, 9)))
    torch.testing.assert_close(
        log_probs.double().exp().sum(-1), torch.ones(2, 9, dtype=torch.float64), rtol=0, atol=1e-5
    )
    initial, _, _ = load_model_dir(lm_run / "best")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), initial.state_dict().values())), (
        "fine-tuning must move the model"
    )
    assert (
        config.model.encoder.hidden_dropout == 0
        and config.model.encoder.weight_dropout == 0
        and config.train.epochs == 1
    )


def test_finetuning_gradient_is_that_of_loss_12(disc_run: Path, lm_run: Path) -> None:
    """One step of the trainer's objective equals eq. (12) written out with the three models."""
    config = derive_config(
        load_model_dir(lm_run / "best")[1],
        "dfinetune",
        [],
        {"kind": "reverse-kl", "base_model": str(lm_run / "best"), "discriminator": str(disc_run / "best")},
        "fine-tuning",
    )
    corpus = load_corpus(config)
    trainer = Trainer(config, lm_run.parent / "unused", corpus, progress=False)
    trainer.objective.prepare(trainer.model)
    x, y = corpus.train[:20].view(2, 10), corpus.train[1:21].view(2, 10)
    out = trainer.model(x)
    got = trainer.objective.chunk_loss(trainer.model, out, x, y, slice(0, 2), 2, False).nll
    q0, _, _ = load_model_dir(lm_run / "best")
    disc, _, _ = load_model_dir(disc_run / "best")
    q0.eval(), disc.eval()
    with torch.no_grad():
        log_q0 = -q0.output.nll(q0(x), y)
        s = disc.output.full_logits(disc(x)).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    log_q = -trainer.model.output.nll(out, y)
    log_t = log_q - log_q0 + s
    expected = -log_q + log_t.exp() * log_t
    torch.testing.assert_close(got, expected)
    assert got.requires_grad


def test_without_discriminator_and_cross_entropy_finetuning(lm_run: Path, tmp_path: Path) -> None:
    assert (
        main(["finetune", str(lm_run), "--without-discriminator", "--out", str(tmp_path / "nod"), "train.epochs=1"])
        == 0
    )
    assert load_model_dir(tmp_path / "nod" / "best")[1].objective.discriminator is None
    assert (
        main(
            [
                "finetune",
                str(lm_run),
                "--cross-entropy",
                "--out",
                str(tmp_path / "ce"),
                "train.epochs=1",
                "train.lr=0.5",
            ]
        )
        == 0
    )
    records = read_metrics(tmp_path / "ce" / "metrics.jsonl")
    assert [r["event"] for r in records][0] == "initial"
    assert "valid_rev_kl" not in _epochs(tmp_path / "ce")[0]


def test_reverse_kl_run_resumes_bit_exactly(disc_run: Path, lm_run: Path, tmp_path: Path) -> None:
    """The frozen models' carried states are part of the checkpoint."""
    objective = {"kind": "reverse-kl", "base_model": str(lm_run / "best"), "discriminator": str(disc_run / "best")}
    config = derive_config(
        load_model_dir(lm_run / "best")[1],
        "dfinetune",
        ["train.epochs=2", "train.checkpoint_interval=3"],
        objective,
        "fine-tuning",
    )
    train(config, tmp_path / "reference", progress=False)

    corpus = load_corpus(config)
    trainer = Trainer(config, tmp_path / "run", corpus, progress=False)
    trainer.start()
    trainer.step_hooks.append(stop_after(5))
    with pytest.raises(Stop):
        trainer.run()
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["objective"]["frozen_states"][0] is not None
    resume(tmp_path / "run", progress=False)
    for sub in ("best", "last"):
        a = load_file(str(tmp_path / "reference" / sub / "model.safetensors"))
        b = load_file(str(tmp_path / "run" / sub / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_refuses_a_non_discriminator(lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bad"
    assert main(["finetune", str(lm_run), "--discriminator", str(lm_run), "--out", str(out)]) == 2
    assert "is not a discriminator" in capsys.readouterr().err
    assert not out.exists()


def test_finetune_refuses_a_discriminator_of_another_architecture(
    lm_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    train(build_config("tiny", [*SMALL, "model.emb_size=12"]), other, progress=False)
    assert main(["train-discriminator", str(other), "--out", str(tmp_path / "odisc"), "train.epochs=1"]) == 0
    out = tmp_path / "bad"
    assert main(["finetune", str(lm_run), "--discriminator", str(tmp_path / "odisc"), "--out", str(out)]) == 2
    assert "differs from the model's architecture in model.input.emb_size" in capsys.readouterr().err
    assert not out.exists()


def test_discriminator_commands_reject_bad_input(
    lm_run: Path, disc_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad"
    assert main(["train-discriminator", str(lm_run), "--out", str(out), "model.hidden_size=30"]) == 2
    assert "keeps the architecture" in capsys.readouterr().err
    assert main(["train-discriminator", str(disc_run), "--out", str(out)]) == 2
    assert "is a discriminator" in capsys.readouterr().err
    assert main(["train-discriminator", str(lm_run), "--out", str(out), "data.synthetic_sentences=500"]) == 2
    assert "reads the data the model was trained on" in capsys.readouterr().err
    assert main(["eval", str(disc_run)]) == 2
    assert "not a language model" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "missing"), "--without-discriminator", "--out", str(out)]) == 2
    assert not out.exists()


def test_discriminator_initialized_from_the_model(lm_run: Path, tmp_path: Path) -> None:
    config = derive_config(
        load_model_dir(lm_run / "best")[1],
        "discriminator",
        [],
        {"kind": "discriminator", "base_model": str(lm_run / "best"), "init_from_base": True},
        "a discriminator",
    )
    trainer = Trainer(config, tmp_path / "run", load_corpus(config), progress=False)
    trainer.objective.prepare(trainer.model)
    q0, _, _ = load_model_dir(lm_run / "best")
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), q0.state_dict().values()))


# ---------------------------------------------------------------- schedules and reductions


def _lrs(run: Path) -> list[float]:
    return [r["lr"] for r in _epochs(run)]


def test_epoch_decay_follows_zaremba_and_inan(tmp_path: Path) -> None:
    config = build_config(
        "tiny",
        [
            "data.synthetic_sentences=100",
            "train.epochs=5",
            "train.finetune=false",
            "train.averaging=none",
            "train.lr=2",
            "train.lr_decay=0.5",
            "train.lr_decay_start=2",
        ],
    )
    train(config, tmp_path / "run", progress=False)
    assert _lrs(tmp_path / "run") == [2, 2, 1, 0.5, 0.25]


def test_plateau_schedule_divides_the_rate_when_validation_stalls(tmp_path: Path) -> None:
    config = build_config(
        "tiny",
        [
            "data.synthetic_sentences=100",
            "train.epochs=4",
            "train.finetune=false",
            "train.averaging=none",
            "train.lr=1e-9",
            "train.plateau_factor=0.1",
        ],
    )
    trainer = Trainer(config, tmp_path / "run", load_corpus(config), progress=False)
    trainer.start()
    trainer.run()
    epochs = _epochs(tmp_path / "run")
    expected, scale = [], 1.0
    for record in epochs:
        expected.append(1e-9 * scale)
        if not record["best"]:
            scale *= 0.1
    assert [r["lr"] for r in epochs] == pytest.approx(expected)
    assert any(not r["best"] for r in epochs[1:]), "with lr 1e-9 the validation loss must stall"


def test_sequence_loss_scales_the_gradient_by_the_window_length(tmp_path: Path) -> None:
    """Summing over T steps and averaging over streams = T x the per-token mean: one SGD step
    with lr and clipping off equals a mean-loss step with T x the learning rate."""
    base = [
        "data.synthetic_sentences=100",
        "train.epochs=1",
        "train.finetune=false",
        "train.averaging=none",
        "train.variable_bptt=false",
        "train.clip=0",
        "train.bptt=10",
        "model.input_dropout=0",
        "model.hidden_dropout=0",
        "model.output_dropout=0",
        "model.weight_dropout=0",
        "model.embed_dropout=0",
        "train.weight_decay=0",
    ]
    models = []
    for extra in (["train.sequence_loss=true", "train.lr=0.01"], ["train.lr=0.1"]):
        config = build_config("tiny", base + extra)
        trainer = Trainer(config, tmp_path / extra[-1], load_corpus(config), progress=False)
        trainer.step_hooks.append(stop_after(1))
        with pytest.raises(Stop):
            trainer._train_epoch()
        models.append(trainer.model.state_dict())
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], rtol=1e-4, atol=1e-6)


def test_unknown_objective_and_missing_base_are_config_errors() -> None:
    with pytest.raises(ReglmError, match="objective: unknown objective 'gan'; choose one of lm, discriminator"):
        build_config(None, ["objective.kind=gan"])
    with pytest.raises(ReglmError, match="objective.base_model"):
        build_config(None, ["objective.kind=discriminator"])
    with pytest.raises(ReglmError, match=r"objective.discriminator \(kind 'lm' has no such option\)"):
        build_config(None, ["objective.discriminator=x"])
