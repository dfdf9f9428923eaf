"""`reglm study trigram` (Popov & Kudinov 2019, section 3) on a tiny corpus: stages, Table 1,
the chosen-word curve, resumption and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from reglm.cli import main
from reglm.data import load_corpus
from reglm.errors import ReglmError
from reglm.modeldir import load_model_dir
from reglm.models import LanguageModel
from reglm.studies.trigram import TrigramStudySpec, fixed_context, frequency_ranking, initial_config

TINY = [
    "--sentences",
    "800",
    "--hidden",
    "8",
    "--batch-size",
    "8",
    "--bptt",
    "12",
    "--epochs",
    "1",
    "--disc-epochs",
    "1",
    "--finetune-epochs",
    "1",
    "--chosen-rank",
    "60",
    "--ce-lrs",
    "0.1",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study") / "trigram"
    assert main(["study", "trigram", "--out", str(out), *TINY, "--json"]) == 0
    return out, json.loads((out / "trigram-study.json").read_text())


def test_every_stage_is_a_run_and_the_figure_is_written(study: tuple[Path, dict]) -> None:
    out, result = study
    for stage in (
        "initial",
        "disc-initial",
        "disc-perturbed",
        "ftd-initial",
        "ftd-perturbed",
        "ce-0.1-initial",
        "ce-0.1-perturbed",
    ):
        assert (out / stage / "results.json").is_file(), stage
    assert (out / "trigram-study.png").stat().st_size > 0
    assert set(result["table"]) == {
        "true distribution",
        "initial model",
        "perturbed model",
        "ftd-initial",
        "ftd-perturbed",
        "ce-0.1-initial",
        "ce-0.1-perturbed",
    }
    for row in result["table"].values():
        assert row["ratio"] == pytest.approx(row["rare_ppl"] / row["frequent_ppl"])


def test_perturbed_model_differs_only_in_the_chosen_words_bias(study: tuple[Path, dict]) -> None:
    out, result = study
    initial, _, vocab = load_model_dir(out / "initial" / "best")
    perturbed, _, _ = load_model_dir(out / "perturbed")
    chosen = vocab.stoi[result["chosen_word"]]
    a, b = initial.state_dict(), perturbed.state_dict()
    for key in a:
        if key != "output.bias":
            assert torch.equal(a[key], b[key]), key
    diff = (a["output.bias"] != b["output.bias"]).nonzero().flatten().tolist()
    assert diff == [chosen] and float(b["output.bias"][chosen]) == -20.0
    corpus = load_corpus(initial_config(TrigramStudySpec(sentences=800)))
    assert frequency_ranking(corpus)[59] == chosen
    assert result["table"]["perturbed model"]["test_ppl"] > result["table"]["initial model"]["test_ppl"]


def test_chosen_word_curve_has_one_point_per_step_from_the_start(study: tuple[Path, dict]) -> None:
    out, result = study
    steps = [
        json.loads(line)["step"]
        for line in (out / "ftd-perturbed" / "metrics.jsonl").read_text().splitlines()
        if '"chosen_word"' in line
    ]
    curve = result["curves"]["ftd-perturbed"]
    assert curve["step"] == steps == list(range(len(steps)))
    assert curve["prob"][0] == pytest.approx(result["p_hat"]["perturbed"]["q0"], rel=1e-5)
    assert all(0 < p < 1 for p in curve["prob"])


def test_validation_curve_and_the_perplexity_without_the_chosen_word(study: tuple[Path, dict]) -> None:
    """Figure 1 (left): a validation perplexity after every fine-tuning step; section 3's perplexity
    over every word but the chosen one, which the perturbed model's -20 bias makes far less likely."""
    _, result = study
    for stage in ("ftd-perturbed", "ce-0.1-perturbed"):
        curve = result["curves"][stage]
        assert curve["valid"]["step"] == curve["step"] and all(p > 1 for p in curve["valid"]["ppl"])
    perturbed = result["table"]["perturbed model"]
    assert perturbed["ppl_except_chosen"] < perturbed["test_ppl"]
    initial = result["table"]["initial model"]
    # one bias apart: the chosen word's mass goes to the other words, which only gain
    assert perturbed["ppl_except_chosen"] <= initial["ppl_except_chosen"]
    assert initial["ppl_except_chosen"] == pytest.approx(perturbed["ppl_except_chosen"], rel=1e-2)


def test_true_row_is_the_true_log_probability_over_the_scored_words(study: tuple[Path, dict]) -> None:
    _, result = study
    corpus = load_corpus(initial_config(TrigramStudySpec(sentences=800)))
    ids, logp = corpus.test, corpus.truth["test"]
    rows, true = ids[1:], logp[1:]  # every target of the split, whatever the batch size
    words = rows != corpus.vocab.eos_id
    assert result["table"]["true distribution"]["test_ppl"] == pytest.approx(
        math.exp(-float(true[words].double().mean()))
    )


def test_fixed_context_ends_where_the_chosen_word_is_most_likely(study: tuple[Path, dict]) -> None:
    _, result = study
    corpus = load_corpus(initial_config(TrigramStudySpec(sentences=800)))
    word = corpus.vocab.stoi[result["chosen_word"]]
    context, prob = fixed_context(corpus, word)
    eos = (context == corpus.vocab.eos_id).nonzero().flatten().tolist()
    from_before_previous = len(eos) == 2 and eos[0] == 0 and eos[1] == 11  # <eos>, 10 words, <eos>, the prefix
    assert from_before_previous or (len(eos) <= 1 and torch.equal(context, corpus.test[: len(context)]))
    hits = (corpus.test == word).nonzero().flatten()
    assert prob == pytest.approx(float(corpus.truth["test"][hits].exp().max()))
    assert result["true_prob"] == pytest.approx(prob)


def test_reproduce_popov_1_runs_the_study_and_writes_table_1(
    study: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`reglm reproduce popov:1` sizes the study by --scale (appendix A at full scale) and writes
    Table 1 with the paper's numbers; here on the finished tiny study, so only the scoring runs."""
    from reglm.reproduce import Budget
    from reglm.reproduce import trigram as table1
    from reglm.reproduce.runs import claim_out, new_manifest

    full = table1.study_spec("full", Budget(), [])
    assert (full.sentences, full.hidden, full.batch_size) == (80000, 256, 1024)
    assert (full.lr, full.clip, full.bptt) == (1.0, 1.0, 11)  # a batch of 1,024 ten-word sentences
    config = initial_config(full)
    assert config.train.schedule.plateau_factor == 0.1 and config.model.encoder.hidden_dropout == 0
    assert config.train.schedule.plateau_stop == 0.001 and config.train.epochs == 100
    assert initial_config(dataclasses.replace(full, plateau_stop=0)).train.schedule.plateau_stop is None
    reduced = table1.study_spec("reduced", Budget(epochs=2), ["data.data_dir=/x"])
    sizes = (reduced.sentences, reduced.hidden, reduced.batch_size, reduced.epochs, reduced.finetune_epochs)
    assert sizes == (20000, 64, 64, 2, 2)
    assert reduced.extra == ("data.data_dir=/x",)
    out = tmp_path / "popov-1"
    claim_out(out, new_manifest("popov", "1", "full", Budget(), []))  # as an interrupted first run leaves it
    shutil.copytree(study[0], out / "study")
    tiny = TrigramStudySpec(
        sentences=800,
        hidden=8,
        batch_size=8,
        bptt=12,
        epochs=1,
        disc_epochs=1,
        finetune_epochs=1,
        chosen_rank=60,
        ce_lrs=(0.1,),
    )
    monkeypatch.setattr(table1, "study_spec", lambda *args: tiny)
    assert main(["reproduce", "popov:1", "--out", str(out)]) == 0
    markdown = capsys.readouterr().out
    saved = json.loads((out / "table.json").read_text())
    assert markdown == (out / "table.md").read_text()
    assert [r["id"] for r in saved["rows"]] == [
        "true distribution",
        "initial model",
        "ftd-initial",
        "perturbed model",
        "ftd-perturbed",
        "ce-0.1-initial",
        "ce-0.1-perturbed",
    ]
    rows = {r["id"]: r for r in saved["rows"]}
    paper = dict(zip(table1.COLUMNS, (85.63, 31.27, 926.78, 29.6, -0.092, 0.521)), ppl_except_chosen=84.56)
    assert rows["ftd-perturbed"]["paper"] == paper
    ours = study[1]["table"]["ftd-perturbed"]["test_ppl"]
    assert rows["ftd-perturbed"]["reglm"]["test_ppl"] == pytest.approx(ours, rel=1e-6)
    assert "| Perturbed model ftd. | " in markdown and "(85.63)" in markdown and "(paper: 84.56)" in markdown
    assert all((out / f).is_file() for f in saved["figures"])


def test_rerun_reuses_finished_stages_and_refuses_other_settings(
    study: tuple[Path, dict], capsys: pytest.CaptureFixture[str]
) -> None:
    out, result = study
    before = (out / "initial" / "best" / "model.safetensors").read_bytes()
    assert main(["study", "trigram", "--out", str(out), *TINY]) == 0
    assert (out / "initial" / "best" / "model.safetensors").read_bytes() == before
    assert "ftd-perturbed" in capsys.readouterr().out
    assert main(["study", "trigram", "--out", str(out), *TINY[:-2], "--ce-lrs", "0.2"]) == 2
    assert "other settings (ce_lrs)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--chosen-rank", "10"], "--chosen-rank 10 must be beyond"),
        (["--perturb-bias", "3"], "--perturb-bias"),
        (["--ce-lrs", "0.1,-1"], "--ce-lrs"),
        (["--disc-lr", "0"], "--disc-lr"),
        (["--synthetic-rule", "stationary"], "--synthetic-rule"),
        (["--plateau-stop", "1"], "--plateau-stop"),
    ],
)
def test_bad_options_exit_2_without_writing(
    tmp_path: Path, options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["study", "trigram", "--out", str(tmp_path / "s"), *options]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_study_recorded_before_the_rule_option_resumes_only_under_the_restart_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "old"
    out.mkdir()
    spec = dataclasses.asdict(
        TrigramStudySpec(
            sentences=800,
            hidden=8,
            batch_size=8,
            bptt=12,
            epochs=1,
            disc_epochs=1,
            finetune_epochs=1,
            chosen_rank=60,
            ce_lrs=(0.1,),
        )
    )
    del spec["synthetic_rule"]
    (out / "study-spec.json").write_text(json.dumps(spec))
    assert main(["study", "trigram", "--out", str(out), *TINY]) == 2
    assert "other settings (synthetic_rule)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["study-spec.json"]


def test_spec_rejects_nonsense() -> None:
    with pytest.raises(ReglmError, match="--hidden"):
        TrigramStudySpec(hidden=0)


@pytest.mark.parametrize(
    ("field", "legacy"),
    [("plateau_stop", 0.0), ("sequence_loss", False), ("embed_init", 0.1)],
)
def test_a_study_recorded_before_an_option_resumes_only_with_its_former_value(
    tmp_path: Path, field: str, legacy: object
) -> None:
    """A study-spec.json without ``field`` was recorded before the option: it resumes with the value
    it trained with (plateau stop off, the mean loss, AWD-LSTM's 0.1 range) and refuses today's
    default, naming the setting."""
    from reglm.studies.trigram import _check_spec

    former = dataclasses.replace(TrigramStudySpec(sentences=800, hidden=8, chosen_rank=60), **{field: legacy})
    saved = dataclasses.asdict(former)
    del saved[field]
    tmp_path.joinpath("study-spec.json").write_text(json.dumps(saved))
    _check_spec(tmp_path, former)
    with pytest.raises(ReglmError, match=rf"other settings \({field}\)"):
        _check_spec(tmp_path, TrigramStudySpec(sentences=800, hidden=8, chosen_rank=60))


def test_the_summed_loss_is_the_default_reading_and_the_mean_an_option() -> None:
    """Appendix A's lr 1.0 and clip 1.0 may refer to each sentence's summed loss (the default,
    ``train.sequence_loss``) or to the mean over tokens (``--no-sequence-loss``)."""
    spec = TrigramStudySpec(sentences=800, hidden=8, chosen_rank=60)
    assert initial_config(spec).train.sequence_loss is True
    assert initial_config(dataclasses.replace(spec, sequence_loss=False)).train.sequence_loss is False


def test_the_embedding_range_reaches_every_model_of_the_study() -> None:
    """``--embed-init r`` draws the initial and every derived model's embedding from U(-r, r) (1.0 by
    default); a range <= 0 is refused."""
    from reglm.config import derive_config

    spec = TrigramStudySpec(sentences=800, hidden=8, chosen_rank=60)
    assert initial_config(dataclasses.replace(spec, embed_init=0.1)).model.input.init_range == 0.1
    config = initial_config(spec)
    assert config.model.input.init_range == 1.0
    disc = derive_config(config, None, ["train.epochs=1"], {"kind": "discriminator", "base_model": "x"}, "a disc")
    assert disc.model.input.init_range == 1.0
    torch.manual_seed(0)
    weight = LanguageModel(config.model, 1001).embedding.weight
    assert 0.9 < float(weight.detach().abs().max()) <= 1.0
    with pytest.raises(ReglmError, match="--embed-init 0"):
        dataclasses.replace(spec, embed_init=0.0)


def test_a_stop_request_ends_the_study_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGINT / SIGTERM (a StopRequest) end the running stage at the end of its step, as in
    ``reglm train``: state.pt written, nothing further trained (a rerun resumes from it)."""
    import signal

    from reglm.errors import TrainingInterrupted
    from reglm.studies.trigram import run_trigram_study
    from reglm.train.checkpoint import load_state
    from reglm.train.run import StopRequest

    spec = TrigramStudySpec(sentences=800, hidden=8, batch_size=8, bptt=12, epochs=2, chosen_rank=60, valid_sentences=0)
    stop = StopRequest()
    stop.request(signal.SIGINT)
    with pytest.raises(TrainingInterrupted):
        run_trigram_study(tmp_path, spec, stop=stop)
    state = load_state(tmp_path / "initial" / "state.pt")
    assert (state["stage"], state["epoch"], state["step"]) == ("main", 0, 1)
    assert not (tmp_path / "initial" / "results.json").exists() and not (tmp_path / "perturbed").exists()
