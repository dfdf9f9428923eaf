"""Inan et al. (2017) in the model and the trainer: reused embeddings (RE), the augmented loss
(AL) as an objective term on the logits the output layer keeps, the VD-LSTM encoder option, Table 1's presets and
their config errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from reglm.config import ModelConfig, build_config, list_presets
from reglm.data import load_corpus
from reglm.errors import ReglmError
from reglm.metrics import read_metrics
from reglm.modeldir import load_model_dir, save_model_dir
from reglm.models import LanguageModel
from reglm.objectives.augmented_loss import AugmentedLoss, augmented_kl
from reglm.objectives.base import TermInputs
from reglm.train.run import train

VD = dict(encoder="vd-lstm", emb_size=12, hidden_size=12, num_layers=2, input_dropout=0.3, hidden_dropout=0.3)


def test_reused_embeddings_share_one_tensor_and_have_no_output_bias(tmp_path: Path) -> None:
    model = LanguageModel(ModelConfig.build(**VD, tie_weights=True, output_bias=False), 30)
    assert model.output.weight is model.embedding.weight
    assert model.output.bias is None
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.startswith("output.bias") for name in names)
    assert model.num_parameters() == sum(p.numel() for p in model.encoder.parameters()) + 30 * 12
    h = torch.randn(2, 3, 12)
    torch.testing.assert_close(model.output.logits(h), h @ model.embedding.weight.T)
    config = build_config(
        None, ["model.encoder=vd-lstm", "model.emb_size=12", "model.hidden_size=12", "model.output_bias=false"]
    )
    corpus = load_corpus(build_config(None, ["data.synthetic_sentences=8"]))
    model = LanguageModel(config.model, len(corpus.vocab))
    save_model_dir(tmp_path / "m", model, config, corpus.vocab)
    loaded, _, _ = load_model_dir(tmp_path / "m")
    assert loaded.output.weight is loaded.embedding.weight and loaded.output.bias is None
    torch.testing.assert_close(loaded.embedding.weight, model.embedding.weight)


def test_untied_baseline_keeps_its_own_projection_and_bias() -> None:
    model = LanguageModel(ModelConfig.build(**VD, tie_weights=False, init_range=0.05), 30)
    assert model.output.weight is not model.embedding.weight
    assert model.output.bias is not None and model.output.bias.shape == (30,)
    assert float(model.output.weight.detach().abs().max()) <= 0.05
    assert all(float(p.detach().abs().max()) <= 0.05 for p in model.encoder.parameters())


def test_augmented_loss_term_is_alpha_times_the_mean_kl() -> None:
    torch.manual_seed(3)
    model = LanguageModel(ModelConfig.build(**VD, tie_weights=False), 30)
    ids, y = torch.randint(0, 30, (2, 5)), torch.randint(0, 30, (2, 5))
    out = model(ids)
    plain = model.output.score(out, y)
    scored = model.output.score(out, y, keep_logits=True)
    logits = model.output.logits(out.output).reshape(-1, 30)
    torch.testing.assert_close(scored.logits, logits)
    term = AugmentedLoss(gamma=0.65, tau=20.0)
    direct = 13.0 * augmented_kl(logits, y.reshape(-1), model.embedding.weight, 20.0).mean()
    torch.testing.assert_close(term(TermInputs(out, y, scored.logits, model)), direct)
    torch.testing.assert_close(scored.nll, plain.nll)
    assert float(plain.penalty) == 0.0 and plain.logits is None


def test_augmented_loss_reads_clean_logits_under_advsoft() -> None:
    torch.manual_seed(4)
    model = LanguageModel(ModelConfig.build(**VD, tie_weights=True, advsoft="relative", advsoft_alpha=0.5), 30)
    ids, y = torch.randint(0, 30, (2, 5)), torch.randint(0, 30, (2, 5))
    out = model(ids)
    both = model.output.score(out, y, adversarial=True, keep_logits=True)
    torch.testing.assert_close(both.nll, model.output.score(out, y, adversarial=True).nll)
    torch.testing.assert_close(both.logits, model.output.logits(out.output).reshape(-1, 30), rtol=0, atol=0)
    assert not torch.allclose(both.nll, model.output.score(out, y).nll)


def test_vd_lstm_model_equals_torch_lstm_in_eval_mode() -> None:
    model = LanguageModel(ModelConfig.build(**VD, tie_weights=False), 30).eval()
    reference = torch.nn.LSTM(12, 12, 2, batch_first=True)
    for li, layer in enumerate(model.encoder.layers):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(reference, f"{name}_l{li}").data.copy_(getattr(layer, f"{name}_l0"))
    ids = torch.randint(0, 30, (3, 7))
    emb = model.embedding(ids)
    expected, _ = reference(emb)
    torch.testing.assert_close(model(ids).output, expected)


def test_training_a_vd_lstm_real_model_end_to_end(tmp_path: Path) -> None:
    config = build_config(
        "vd-lstm-ptb-small-real",
        [
            "data.name=synthetic",
            "data.synthetic_sentences=200",
            "model.emb_size=16",
            "model.hidden_size=16",
            "train.epochs=2",
            "train.batch_size=8",
            "train.eval_batch_size=4",
            "train.test_batch_size=4",
            "train.bptt=12",
            "train.log_interval=5",
        ],
    )
    results = train(config, tmp_path / "run", progress=False)
    assert results["test"]["ppl"] < 1001
    epochs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "epoch"]
    assert [r["lr"] for r in epochs] == [1.0, 1.0]
    model, _, _ = load_model_dir(tmp_path / "run" / "best")
    assert model.output.weight is model.embedding.weight and model.output.bias is None


TABLE1 = {
    ("ptb", "small"): 0.7,
    ("ptb", "medium"): 0.5,
    ("ptb", "large"): 0.35,
    ("wt2", "small"): 0.8,
    ("wt2", "medium"): 0.6,
}


@pytest.mark.parametrize(("cell", "variant"), list(itertools.product(TABLE1, ["", "-al", "-re", "-real"])))
def test_every_table1_cell_has_a_preset(cell: tuple[str, str], variant: str) -> None:
    dataset, size = cell
    name = f"vd-lstm-{dataset}-{size}{variant}"
    description = dict(list_presets())[name]
    assert "Inan et al. 2017, Table 1" in description
    config = build_config(name)
    units = {"small": 200, "medium": 650, "large": 1500}[size]
    i, e, o, t = config.model.input, config.model.encoder, config.model.output, config.train
    assert (e.kind, i.emb_size, e.hidden_size, e.num_layers) == ("vd-lstm", units, units, 2)
    assert e.hidden_dropout == i.dropout == TABLE1[cell] and i.embed_dropout == 0
    assert (t.optimizer.lr, t.batching.bptt, t.batching.variable_bptt, t.averaging.kind) == (1.0, 35, False, "none")
    assert (t.schedule.decay_start, t.schedule.decay, t.clip) == {
        "small": (5, 0.9, 5.0),
        "medium": (10, 0.9, 5.0),
        "large": (1, 0.97, 6.0),
    }[size]
    assert o.tie_weights == (not o.bias) == (variant in ("-re", "-real"))
    if variant in ("-al", "-real"):
        assert t.terms.aug_tau == 20.0 and (
            0.5 <= t.terms.aug_gamma <= 0.8 if dataset == "ptb" else 1.0 <= t.terms.aug_gamma <= 1.5
        )
    else:
        assert t.terms.aug_gamma == 0


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["train.aug_tau=0"], "invalid option train.terms.aug_tau"),
        (["train.aug_tau=-1"], "invalid option train.terms.aug_tau"),
        (["train.aug_gamma=-0.1"], "invalid option train.terms.aug_gamma"),
        (
            ["model.encoder=vd-lstm", "model.emb_size=20", "model.hidden_size=30"],
            "invalid option model.output.tie_weights",
        ),
        (["model.encoder=vd-lstm", "model.weight_dropout=0.5"], "unknown option model.encoder.weight_dropout"),
        (["model.output=mos", "model.output_bias=false"], "unknown option model.output.bias"),
        (["model.output=mos", "train.aug_gamma=1"], "invalid option train.terms.aug_gamma"),
        (["train.lr_decay=1.5"], "invalid option train.schedule.decay"),
        (["train.plateau_factor=1"], "invalid option train.schedule.plateau_factor"),
    ],
)
def test_bad_options_are_config_errors(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ReglmError, match=fragment):
        build_config(None, overrides)


def test_reused_embeddings_with_a_projection_are_allowed() -> None:
    """A mixture of softmaxes projects the hidden state to emb_size, so tying works with emb != hidden."""
    config = build_config(
        None,
        ["model.encoder=vd-lstm", "model.emb_size=20", "model.hidden_size=30", "model.output=mos", "model.n_experts=2"],
    )
    model = LanguageModel(config.model, 40)
    assert model.output.weight is model.embedding.weight


def test_analyze_subspace_reports_each_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from reglm.cli import main

    small = ["data.synthetic_sentences=100", "train.epochs=1", "train.finetune=false"]
    train(build_config("tiny", small), tmp_path / "tied", progress=False)
    train(build_config("tiny", [*small, "model.tie_weights=false"]), tmp_path / "untied", progress=False)
    out = tmp_path / "analysis"
    assert (
        main(["analyze", str(tmp_path / "tied"), str(tmp_path / "untied"), "--subspace", "--out", str(out), "--json"])
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["runs"]
    assert rows[0]["tied"] and rows[0]["distance"] < 1e-6
    assert not rows[1]["tied"] and rows[1]["distance"] > 0.5
    assert json.loads((out / "subspace.json").read_text())["runs"] == rows
    assert main(["analyze", str(tmp_path / "missing"), "--subspace", "--out", str(out)]) == 2


def test_study_subspace_command_writes_both_panels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from reglm.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = [f"w{i}" for i in range(25)]
    g = torch.Generator().manual_seed(0)
    for split, lines in (("train", 60), ("valid", 5), ("test", 5)):
        text = "\n".join(
            " ".join(words[int(i)] for i in torch.randint(0, 25, (12,), generator=g)) for _ in range(lines)
        )
        (corpus / f"{split}.txt").write_text(text + "\n")
    out = tmp_path / "study"
    args = [
        "study",
        "subspace",
        "--out",
        str(out),
        "--data",
        str(corpus),
        "--words",
        "500",
        "--hidden",
        "6",
        "--epochs",
        "1",
        "--runs",
        "2",
        "--betas",
        "0,1",
        "--taus",
        "2,10",
        "--batch-size",
        "4",
        "--bptt",
        "8",
        "--json",
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "subspace-study.json").read_text())
    assert saved["panels"]["beta"]["x"] == [0.0, 1.0] and saved["panels"]["tau"]["x"] == [2.0, 10.0]
    assert all(len(d) == 2 for d in saved["panels"]["beta"]["distances"])
    assert printed["panels"] == saved["panels"]
    assert (out / "subspace-study.png").stat().st_size > 0
    assert main([*args[:-1], "--taus", "0"]) == 2
    assert "--taus" in capsys.readouterr().err


def test_trainer_weights_the_augmented_loss_by_gamma_tau() -> None:
    from reglm.objectives.objective import LMObjective

    config = build_config("vd-lstm-ptb-small-al", ["data.name=synthetic"])
    objective = LMObjective(
        config, load_corpus(build_config(None, ["data.synthetic_sentences=8"])).vocab, torch.device("cpu")
    )
    (term,) = objective.terms
    assert (term.weight, term.tau, term.target_grad) == (pytest.approx(0.65 * 20.0), 20.0, False)
