"""Every load of a cached corpus checks what it maps (ids inside the vocabulary, the dtype the
vocabulary's size gives, the counts), and a build removes what a killed build left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reglm.data.cache import MANIFEST, load_cached


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGLM_DATA_DIR", str(tmp_path / "cache"))


def corpus(root: Path, repeat: int = 50) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, text in {"train": "a b c\nb c a d\n" * repeat, "valid": "a c\n", "test": "b d\n"}.items():
        (root / f"{split}.txt").write_text(text)
    return root


def test_an_id_outside_the_vocabulary_is_found_and_the_entry_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = corpus(tmp_path / "c")
    good = load_cached(root)
    expected = good.train.clone()
    for split in ("train", "valid"):
        ids_file = good.cache.path / f"{split}.ids"
        data = bytearray(ids_file.read_bytes())
        data[1] = 200  # uint8 ids of a 6-word vocabulary: 200 would index past the embedding
        ids_file.write_bytes(bytes(data))
        again = load_cached(root)
        err = capsys.readouterr().err
        assert (
            f"{split}.ids holds the value 200, outside 0 .. {len(good.vocab) - 1}" in err
            and str(good.cache.path) in err
        ), err
        assert torch.equal(again.train, expected) and int(again.split(split).max()) < len(good.vocab)


def test_a_manifest_that_lies_about_the_dtype_or_the_count_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = corpus(tmp_path / "c")
    good = load_cached(root)
    expected = good.train.clone()
    path = good.cache.path / MANIFEST
    for edit, message in (
        (("dtype", "uint16"), "holds uint16"),
        (("tokens", -3), "not a count"),
        (("tokens", "12"), "not a count"),
    ):
        manifest = json.loads(path.read_text())
        part = manifest["identity"]["splits"]["train"]
        part[edit[0]] = edit[1]
        if edit == ("dtype", "uint16"):
            part["tokens"] //= 2  # the size check alone would pass
        path.write_text(json.dumps(manifest))
        again = load_cached(root)
        assert message in capsys.readouterr().err
        assert torch.equal(again.train, expected)


def test_a_build_killed_with_sigkill_leaves_nothing_behind_for_good(tmp_path: Path) -> None:
    root = corpus(tmp_path / "c", repeat=400_000)  # a few seconds of encoding
    code = f"from reglm.data.cache import load_cached; load_cached({str(root)!r}, progress=False)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ})
    encoded = tmp_path / "cache" / "encoded"
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") for p in encoded.glob(".*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    staging = [p for p in encoded.glob(".*.tmp")]
    assert staging, "the build was killed while its staging directory existed"
    corpus_ = load_cached(root, progress=False)
    assert not list(encoded.glob(".*.tmp")) and corpus_.train.numel() == 9 * 400_000


def test_eval_rebuilds_a_damaged_entry_and_scores_as_before(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from reglm.cli import main
    from reglm.config import build_config
    from reglm.train.run import train

    root = corpus(tmp_path / "c")
    for split in ("valid", "test"):
        (root / f"{split}.txt").write_text("a c b d\nb d a\n" * 10)
    run = tmp_path / "run"
    train(build_config("tiny", [f"data.name={root}", "train.epochs=1", "train.finetune_epochs=0"]), run, progress=False)
    assert main(["eval", str(run), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    entry = next(p for p in (tmp_path / "cache" / "encoded").iterdir() if p.is_dir() and not p.name.startswith("."))
    data = bytearray((entry / "valid.ids").read_bytes())
    data[0] = 250
    (entry / "valid.ids").write_bytes(bytes(data))
    assert main(["eval", str(run), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "valid.ids holds the value 250" in err and "Traceback" not in err, err
    assert json.loads(out)["ppl"] == before["ppl"]
