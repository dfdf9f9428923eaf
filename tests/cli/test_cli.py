"""The command line end to end on the tiny preset, and every bad input: exit 2, one line, no damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reglm.cli import main


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(run), "train.finetune=false", "train.epochs=2"]) == 0
    return run


def test_train_eval_generate(capsys: pytest.CaptureFixture, run_dir: Path) -> None:
    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--split", "test", "--json")
    assert code == 0
    result = json.loads(out)
    saved = json.loads((run_dir / "results.json").read_text())
    assert result["ppl"] == pytest.approx(saved["test"]["ppl"], rel=1e-9)
    assert result["tokens"] == saved["test"]["tokens"] > 0
    assert result["synthetic"]["true_word_ppl"] > 1

    code, out, _ = run_cli(capsys, "eval", str(run_dir))
    assert code == 0 and out.startswith("valid: loss")

    code, first, _ = run_cli(capsys, "generate", str(run_dir), "--words", "12", "--seed", "3", "--prompt", "w1 w2")
    assert code == 0
    code, second, _ = run_cli(capsys, "generate", str(run_dir), "--words", "12", "--seed", "3", "--prompt", "w1 w2")
    assert first == second and first.startswith("w1 w2")
    text = first.rstrip("\n")
    assert len(text.split()) + text.count("\n") == 14, "prompt + sampled words, <eos> shown as a line break"


def test_presets_and_config_listing(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(capsys, "presets")
    assert code == 0 and "awd-lstm-ptb" in out and "Table 1" in out
    code, out, _ = run_cli(capsys, "config")
    assert code == 0 and "train.optimizer.lr" in out and "model.encoder.weight_dropout" in out


def test_data_info(capsys: pytest.CaptureFixture, shared_data: Path) -> None:
    code, out, _ = run_cli(capsys, "data", "info", "ptb", "--data-dir", str(shared_data), "--json")
    assert code == 0
    info = json.loads(out)
    assert json.dumps(info).count("929589") >= 1 and json.dumps(info).count("10000") >= 1


def test_data_info_synthetic_statistics(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from reglm.data.synthetic import PAPER_STATS, TrigramLanguage, synthetic_corpus, synthetic_stats

    argv = ["data", "info", "synthetic", "--data-dir", str(tmp_path), "--synthetic-sentences", "80"]
    code, out, _ = run_cli(capsys, *argv, "--json")
    assert code == 0
    info = json.loads(out)["synthetic"]
    corpus = synthetic_corpus(seed=0, data_dir=tmp_path, sizes=(80, 10, 10))
    expected = synthetic_stats(corpus, language=TrigramLanguage(seed=0))
    assert expected["test_ppl_xi_averaged"] > expected["test_ppl"]
    assert info["rule"] == "stream" and info["paper"] == PAPER_STATS
    assert info["measured"] == pytest.approx(expected, rel=1e-12)
    code, out, _ = run_cli(capsys, *argv, "--synthetic-rule", "restart", "--json")
    assert code == 0 and json.loads(out)["synthetic"]["measured"] != info["measured"]
    code, out, _ = run_cli(capsys, *argv)
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["test_ppl"])
    assert code == 0 and row[-1] == "78.14", out
    _expect_usage_error(capsys, "synthetic_rule", *argv, "--synthetic-rule", "stationary")


def _expect_usage_error(capsys: pytest.CaptureFixture, fragment: str, *argv: str) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("reglm: error:")
    assert fragment in err, err


def test_bad_data_inputs(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    _expect_usage_error(
        capsys, "does not exist", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")
    )
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("a b c\n")
    (corpus / "valid.txt").write_text("a b\n")
    _expect_usage_error(capsys, "test.txt", "data", "info", str(corpus))
    (corpus / "test.txt").write_text("")
    _expect_usage_error(capsys, "test.txt", "data", "info", str(corpus))
    (corpus / "test.txt").write_bytes(b"a b\n\xff\xfe c\n")
    _expect_usage_error(capsys, "line 2", "data", "info", str(corpus))
    (corpus / "test.txt").write_text("a zebra\n")
    _expect_usage_error(capsys, "zebra", "data", "info", str(corpus))
    _expect_usage_error(capsys, "wikitext-2", "data", "info", "no-such-corpus-name")
    _expect_usage_error(capsys, "min_freq", "data", "info", str(corpus), "--min-freq", "0")
    assert not (tmp_path / "r").exists()


def test_bad_options(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    _expect_usage_error(capsys, "unknown preset", "train", "--preset", "nope", "--out", str(tmp_path / "a"))
    _expect_usage_error(
        capsys, "unknown override key", "train", "--preset", "tiny", "train.nope=3", "--out", str(tmp_path / "b")
    )
    _expect_usage_error(
        capsys, "weight_dropout", "train", "--preset", "tiny", "weight_dropout=2", "--out", str(tmp_path / "c")
    )
    assert not any((tmp_path / n).exists() for n in "abc")


def test_bad_checkpoints_and_prompts(capsys: pytest.CaptureFixture, run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    _expect_usage_error(capsys, "not in the model's vocabulary", "generate", str(copy), "--prompt", "w1 zebra")
    _expect_usage_error(capsys, "temperature", "generate", str(copy), "--temperature", "0")

    weights = copy / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    _expect_usage_error(capsys, "model.safetensors", "eval", str(copy))
    weights.write_bytes(b"\x00" * 64)
    _expect_usage_error(capsys, "model.safetensors", "eval", str(copy))

    state = copy / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    _expect_usage_error(capsys, "state.pt", "train", "--resume", str(copy))
    assert state.stat().st_size == 100, "a failed resume must not rewrite the state"

    _expect_usage_error(capsys, "no-run-here", "eval", str(tmp_path / "no-run-here"))
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "valid", "test"):
        (other / f"{split}.txt").write_text("x y z\n")
    _expect_usage_error(capsys, "another vocabulary", "eval", str(run_dir), "--data", str(other))


def test_resume_with_changed_vocabulary(capsys: pytest.CaptureFixture, run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "vocab.txt").write_text("<eos>\t1\nw1\t1\n")
    _expect_usage_error(capsys, "vocabulary", "train", "--resume", str(copy))


def test_existing_run_is_not_overwritten(capsys: pytest.CaptureFixture, run_dir: Path) -> None:
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    _expect_usage_error(capsys, "already holds a run", "train", "--preset", "tiny", "--out", str(run_dir))
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert before == after


def _tsv(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_eval_with_cache_and_word_outputs(capsys: pytest.CaptureFixture, run_dir: Path, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--split", "test", "--batch-size", "4", "--json")
    plain = json.loads(out)
    code, out, _ = run_cli(
        capsys,
        "eval",
        str(run_dir),
        "--split",
        "test",
        "--batch-size",
        "4",
        "--cache",
        "window=50,theta=0.5,lambda=0",
        "--json",
    )
    assert code == 0 and json.loads(out)["loss"] == plain["loss"], "lambda=0 is plain evaluation"

    probs, deltas = tmp_path / "out" / "probs.tsv", tmp_path / "deltas.tsv"
    code, out, _ = run_cli(
        capsys,
        "eval",
        str(run_dir),
        "--cache",
        "lambda=0.2,window=50,theta=0.5",
        "--word-probs",
        str(probs),
        "--cache-deltas",
        str(deltas),
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["mode"] == "cache" and result["split"] == "valid" and result["batch_size"] == 1
    assert result["cache"] == {"window": 50, "theta": 0.5, "lambda": 0.2}
    assert result["model_ppl"] > 1 and result["word_probs"] == str(probs)
    rows = _tsv(probs)
    assert len(rows) == result["tokens"] + 1 and [int(r["position"]) for r in rows] == list(range(len(rows))), (
        "every token, the first after <eos>"
    )
    assert sum(float(r["log_prob"]) for r in rows[1:]) == pytest.approx(-result["loss"] * result["tokens"], rel=1e-6)
    table = _tsv(deltas)
    assert sum(int(r["count"]) for r in table) == result["tokens"]
    assert sum(float(r["delta_loss"]) for r in table) == pytest.approx(
        (result["loss"] - result["model_loss"]) * result["tokens"], abs=1e-3
    )

    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--word-probs", str(probs), "--json")
    result = json.loads(out)
    assert code == 0 and result["mode"] == "plain" and len(_tsv(probs)) == result["tokens"] + 1

    code, out, _ = run_cli(
        capsys, "eval", str(run_dir), "--cache-search", "window=20,100;theta=0.3;lambda=0.1,0.3", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["mode"] == "cache-search" and result["split"] == "test" and result["search"]["split"] == "valid"
    assert len(result["search"]["results"]) == 4 and result["cache"] == result["search"]["best"]
    assert result["search"]["loss"] == min(r["loss"] for r in result["search"]["results"])
    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--cache-search", "window=20;theta=0.3;lambda=0.1")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("cache search on valid (1 settings): best window=20,theta=0.3,lambda=0.1")
    assert lines[1].startswith("test: loss") and "cache window=20,theta=0.3,lambda=0.1" in lines[1]


def test_bad_cache_options(capsys: pytest.CaptureFixture, run_dir: Path, tmp_path: Path) -> None:
    probs = tmp_path / "probs.tsv"
    for spec, fragment in (
        ("window:2000", "--cache: 'window:2000' is malformed"),
        ("window=0", "--cache: window=0"),
        ("theta=-1", "--cache: theta=-1"),
        ("lambda=1.5", "--cache: lambda=1.5"),
        ("window=100,gamma=1", "--cache: unknown key 'gamma'"),
    ):
        _expect_usage_error(capsys, fragment, "eval", str(run_dir), "--cache", spec, "--word-probs", str(probs))
    _expect_usage_error(
        capsys,
        "--cache-search: window=0",
        "eval",
        str(run_dir),
        "--cache-search",
        "window=0,10",
        "--word-probs",
        str(probs),
    )
    _expect_usage_error(
        capsys,
        "--cache-deltas",
        "eval",
        str(run_dir),
        "--cache-deltas",
        str(tmp_path / "d.tsv"),
        "--word-probs",
        str(probs),
    )
    _expect_usage_error(capsys, "--word-probs", "eval", str(run_dir), "--cache", "--word-probs", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["eval", str(run_dir), "--cache", "window=10", "--cache-search"])
    assert info.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "a rejected command writes nothing"


def test_eval_with_dynamic_evaluation(capsys: pytest.CaptureFixture, run_dir: Path, tmp_path: Path) -> None:
    code, out, _ = run_cli(capsys, "eval", str(run_dir), "--batch-size", "2", "--json")
    plain = json.loads(out)
    code, out, _ = run_cli(
        capsys, "eval", str(run_dir), "--batch-size", "2", "--dynamic", "lr=0,lambda=0,max_train_tokens=2000", "--json"
    )
    result = json.loads(out)
    assert code == 0 and result["mode"] == "dynamic" and result["batch_size"] == 2
    assert result["loss"] == pytest.approx(plain["loss"], abs=1e-6), "lr = lambda = 0 is plain evaluation"

    probs = tmp_path / "probs.tsv"
    code, out, _ = run_cli(
        capsys,
        "eval",
        str(run_dir),
        "--dynamic",
        "variant=sgd,lr=0.5,lambda=0.01,batch_size=3",
        "--word-probs",
        str(probs),
        "--json",
    )
    result = json.loads(out)
    assert code == 0 and result["batch_size"] == 3 and result["dynamic"]["variant"] == "sgd"
    assert len(_tsv(probs)) == result["tokens"] + 1

    code, out, _ = run_cli(
        capsys, "eval", str(run_dir), "--dynamic-search", "lr=0,1e-3;lambda=0,0.01;max_train_tokens=2000", "--json"
    )
    result = json.loads(out)
    assert code == 0 and result["mode"] == "dynamic-search" and result["split"] == "test"
    assert len(result["search"]["results"]) == 4


def test_bad_dynamic_options(capsys: pytest.CaptureFixture, run_dir: Path, tmp_path: Path) -> None:
    probs = tmp_path / "probs.tsv"
    for spec, fragment in (
        ("lr=-1", "--dynamic"),
        ("segment=0", "--dynamic"),
        ("variant=adam", "--dynamic"),
        ("speed=3", "--dynamic"),
        ("variant=sgd", "lr"),
    ):
        _expect_usage_error(capsys, fragment, "eval", str(run_dir), "--dynamic", spec, "--word-probs", str(probs))
    with pytest.raises(SystemExit) as info:
        main(["eval", str(run_dir), "--dynamic", "--cache"])
    assert info.value.code == 2
    assert not probs.exists()
