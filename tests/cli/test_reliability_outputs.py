"""Outputs: a short write (a full disk, a file-size limit) raises and never becomes the file, an
output never deletes a file it did not write nor replaces its own input, and the standard
streams of ``reglm score`` fail with one line."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from reglm.cli import main
from reglm.config import build_config
from reglm.io import write_bytes
from reglm.modeldir import load_model_dir, save_model_dir
from reglm.train.checkpoint import save_state
from reglm.train.run import train

SMALL = ["data.synthetic_sentences=200", "train.epochs=1", "train.finetune_epochs=0"]
LIMIT = 4096
"""The file-size limit (bytes) of the processes that meet a short write: every file below is larger."""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("outputs") / "run"
    train(build_config("tiny", SMALL), run, progress=False)
    return run


@contextmanager
def file_size_limit(limit: int = LIMIT) -> Iterator[None]:
    """Files of this process limited to ``limit`` bytes (``ulimit -f``; Python ignores SIGXFSZ, so
    a write past the limit is short, then fails with EFBIG); the previous limit restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def reglm(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "reglm", *argv], capture_output=True, text=True, check=False, **kwargs)


def expect_error(capsys: pytest.CaptureFixture, fragment: str, *argv: str) -> str:
    with file_size_limit(1 << 30):
        code = main(list(argv))
    err = capsys.readouterr().err
    assert (
        code == 2 and "Traceback" not in err and err.startswith("reglm: error:") and len(err.strip().splitlines()) == 1
    ), err
    assert fragment in err, err
    return err


def one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert (
        "Traceback" not in proc.stderr
        and proc.stderr.startswith("reglm: error:")
        and len(proc.stderr.strip().splitlines()) == 1
    ), proc.stderr
    assert fragment in proc.stderr, proc.stderr


def words(run: Path, lines: int) -> Path:
    """A file of ``lines`` sentences of words of the run's vocabulary."""
    vocab = [line.split("\t")[0] for line in (run / "vocab.txt").read_text().splitlines()[1:6]]
    path = run.parent / f"sentences-{lines}.txt"
    path.write_text("".join(" ".join(vocab) + "\n" for _ in range(lines)))
    return path


# ------------------------------------------------------------------ short writes


def test_a_short_write_raises_and_the_good_file_stays(run: Path, tmp_path: Path) -> None:
    shutil.copytree(run / "best", tmp_path / "model")
    target = tmp_path / "model" / "model.safetensors"
    good = target.read_bytes()
    writers = {
        "bytes": lambda: write_bytes(target, bytes(3 * LIMIT)),
        "torch.save": lambda: save_state(target, {"x": torch.zeros(LIMIT)}),
        "model directory": lambda: save_model_dir(target.parent, *load_model_dir(run / "best")),
    }
    for name, write in writers.items():
        with pytest.raises(OSError) as caught, file_size_limit():
            write()
        assert caught.value.errno == errno.EFBIG and caught.value.filename == str(target), name
        assert target.read_bytes() == good, name
        assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")], name


def test_score_out_under_a_file_size_limit_keeps_the_previous_scores(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "scores.tsv"
    out.write_text("previous scores\n")
    text = words(run, 2000)
    with file_size_limit():
        code = main(["score", str(run), str(text), "--out", str(out)])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("reglm: error:")
        and "File too large" in err
        and str(out) in err
        and "--resume" not in err
    ), err
    assert out.read_text() == "previous scores\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.tsv"]


def test_export_checks_the_file_on_disk_and_a_short_write_keeps_the_previous_export(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    spec = json.loads((out / "export.json").read_text())
    assert spec["check"]["on"] == "the model file read back from disk" and spec["files"] == [
        "model.pt",
        "vocab.txt",
        "export.json",
    ]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before["model.pt"]) > LIMIT
    capsys.readouterr()
    with file_size_limit():
        code = main(["export", str(run), "--format", "torchscript", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("reglm: error:") and "File too large" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"], "no staging directory is left behind"


# ------------------------------------------------------------------ outputs and inputs


def test_export_never_deletes_a_file_it_did_not_write(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "export"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    (out / "README").write_text("my notes")
    (out / "model.onnx").write_text("my own graph")
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    assert (out / "README").read_text() == "my notes" and (out / "model.onnx").read_text() == "my own graph"
    capsys.readouterr()
    # a new file in the way of one of the user's is refused, and nothing changes
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    pytest.importorskip("onnxruntime", reason="the ONNX export needs onnxruntime")
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reglm: error:") and "holds model.onnx, which no export wrote there" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # an export.json that no export of reglm wrote does not make the directory an export
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "export.json").write_text('{"note": "mine"}')
    (foreign / "vocab.txt").write_text("my words")
    assert main(["export", str(run), "--format", "torchscript", "--out", str(foreign)]) == 2
    assert (
        "not an export.json of reglm" in capsys.readouterr().err and (foreign / "vocab.txt").read_text() == "my words"
    )


def test_outputs_never_write_over_their_own_input(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = words(run, 3)
    mine = tmp_path / "input.txt"
    shutil.copy(text, mine)
    (tmp_path / "symlink.txt").symlink_to(mine)
    os.link(mine, tmp_path / "hardlink.txt")
    vocab = (run / "best" / "vocab.txt").read_bytes()
    for out in (mine, tmp_path / "symlink.txt", tmp_path / "hardlink.txt", run / "best" / "vocab.txt"):
        expect_error(capsys, "would replace its own input", "score", str(run), str(mine), "--out", str(out))
        assert mine.read_bytes() == text.read_bytes() and (run / "best" / "vocab.txt").read_bytes() == vocab
    for option in ("--word-probs", "--cache-deltas"):
        cache = ["--cache", "theta=0.3,lambda=0.1,window=10"] if option == "--cache-deltas" else []
        expect_error(capsys, "would replace its own input", "eval", str(run), *cache, option, str(run / "vocab.txt"))
    assert (run / "best" / "vocab.txt").read_bytes() == (run / "vocab.txt").read_bytes() == vocab
    # an export writes no file over its model directory's (nor over --text)
    expect_error(
        capsys, "would replace its own input", "export", str(run), "--format", "torchscript", "--out", str(run / "best")
    )


# ------------------------------------------------------------------ standard streams


def test_score_with_closed_or_full_standard_streams_is_one_line(
    run: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = str(words(run, 3000))
    # a process started with a closed stdin or stdout has None there (as `reglm score RUN - <&-`)
    monkeypatch.setattr(sys, "stdin", None)
    expect_error(capsys, "standard input is closed", "score", str(run), "-")
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        err = expect_error(capsys, "No space left on device", "score", str(run), text)
        assert "--resume" not in err and "standard output" in err
    monkeypatch.setattr(sys, "stdout", None)
    expect_error(capsys, "standard output is closed", "score", str(run), text)
    monkeypatch.undo()
    # and for real, in a process started with its standard input closed
    one_line_error(reglm("score", str(run), "-", preexec_fn=lambda: os.close(0)), "standard input is closed")


def test_an_empty_input_scores_no_sentence(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert main(["score", str(run), str(empty)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["id\tln_prob\ttokens\toov\tppl"] and "scored 0 sentences" in err, out + err
