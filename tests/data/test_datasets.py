"""Built-in corpora: cache location, offline copies, download + extract + verify from local archives, resolve."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from reglm.data import datasets
from reglm.data.corpus import cache_dir
from reglm.data.datasets import SOURCES, Source, download, resolve
from reglm.errors import ReglmError

TEXTS = {"train": "a b c\nb c\n\nc\n", "valid": "a c\n", "test": "b\n"}
MEMBERS = {s: f"tiny/data/tiny.{s}.txt" for s in TEXTS}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_tgz(path: Path, texts: dict[str, str], prefix: str = "./") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for split, text in texts.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(prefix + MEMBERS[split])
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, texts: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for split, text in texts.items():
            zf.writestr(MEMBERS[split], text)
    return path


def tiny_source(archive: Path, by_hash: bool = True) -> Source:
    return Source(
        url=archive.as_uri(),
        members=dict(MEMBERS),
        tokens=(10, 3, 2),
        vocab_size=4,
        sha256={s: sha(t) for s, t in TEXTS.items()} if by_hash else None,
    )


def cache_listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_cache_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("REGLM_DATA_DIR", str(tmp_path / "env"))
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert cache_dir() == tmp_path / "env"
    monkeypatch.delenv("REGLM_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "reglm"


def test_offline_copies_are_used_in_place(shared_data: Path) -> None:
    before = cache_listing(shared_data)
    assert download("ptb", data_dir=shared_data) == shared_data / "ptb"
    assert download("wikitext-2", data_dir=shared_data) == shared_data / "wikitext-2"
    corpus = resolve("ptb", data_dir=shared_data)
    assert corpus.name == "ptb" and len(corpus.vocab) == 10_000
    assert cache_listing(shared_data) == before


def test_damaged_cached_copy_is_reported_not_deleted(tmp_path) -> None:
    for split in TEXTS:
        (tmp_path / "ptb").mkdir(exist_ok=True)
        (tmp_path / "ptb" / f"{split}.txt").write_text("not ptb\n", encoding="utf-8")
    with pytest.raises(ReglmError, match=r"ptb train\.txt does not match .*sha256.*delete"):
        download("ptb", data_dir=tmp_path)
    assert (tmp_path / "ptb" / "train.txt").read_text(encoding="utf-8") == "not ptb\n"


@pytest.mark.parametrize("kind", ["tgz", "zip"])
def test_download_extract_verify(monkeypatch, tmp_path, kind: str) -> None:
    archive = make_tgz(tmp_path / "t.tgz", TEXTS) if kind == "tgz" else make_zip(tmp_path / "t.zip", TEXTS)
    monkeypatch.setitem(SOURCES, "tiny", tiny_source(archive))
    cache = tmp_path / "cache"
    target = download("tiny", data_dir=cache)
    assert target == cache / "tiny"
    assert cache_listing(cache) == ["tiny", "tiny/test.txt", "tiny/train.txt", "tiny/valid.txt"]
    for split, text in TEXTS.items():
        assert (target / f"{split}.txt").read_text(encoding="utf-8") == text
    corpus = resolve("tiny", data_dir=cache)
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (10, 3, 2)
    # a second call finds the files and does not download again
    archive.unlink()
    assert download("tiny", data_dir=cache) == target


def test_download_verified_by_counts(monkeypatch, tmp_path) -> None:
    archive = make_tgz(tmp_path / "t.tgz", TEXTS, prefix="")
    monkeypatch.setitem(SOURCES, "tiny", tiny_source(archive, by_hash=False))
    assert download("tiny", data_dir=tmp_path / "ok") == tmp_path / "ok" / "tiny"
    monkeypatch.setitem(SOURCES, "tiny", dataclasses.replace(tiny_source(archive, by_hash=False), tokens=(11, 3, 2)))
    with pytest.raises(ReglmError, match=r"train\.txt has 10 tokens, the published file 11"):
        download("tiny", data_dir=tmp_path / "bad")
    assert cache_listing(tmp_path / "bad") == []
    monkeypatch.setitem(SOURCES, "tiny", dataclasses.replace(tiny_source(archive, by_hash=False), vocab_size=5))
    with pytest.raises(ReglmError, match="word types"):
        download("tiny", data_dir=tmp_path / "bad")
    assert cache_listing(tmp_path / "bad") == []


def test_wrong_content_leaves_nothing(monkeypatch, tmp_path) -> None:
    archive = make_zip(tmp_path / "t.zip", {**TEXTS, "valid": "a c changed\n"})
    monkeypatch.setitem(SOURCES, "tiny", tiny_source(archive))
    cache = tmp_path / "cache"
    with pytest.raises(ReglmError, match=r"tiny valid\.txt does not match .*--data-dir"):
        download("tiny", data_dir=cache)
    assert cache_listing(cache) == []


def test_missing_member_and_damaged_archive(monkeypatch, tmp_path) -> None:
    archive = make_tgz(tmp_path / "t.tgz", {"train": TEXTS["train"], "valid": TEXTS["valid"]})
    monkeypatch.setitem(SOURCES, "tiny", tiny_source(archive))
    with pytest.raises(ReglmError, match=r"has no tiny/data/tiny\.test\.txt"):
        download("tiny", data_dir=tmp_path / "cache")
    assert cache_listing(tmp_path / "cache") == []
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not an archive")
    monkeypatch.setitem(SOURCES, "tiny", tiny_source(junk))
    with pytest.raises(ReglmError, match="damaged"):
        download("tiny", data_dir=tmp_path / "cache")
    assert cache_listing(tmp_path / "cache") == []


def test_network_error_names_url_and_manual_route(monkeypatch, tmp_path) -> None:
    missing = tmp_path / "nowhere" / "t.zip"
    monkeypatch.setitem(SOURCES, "tiny", tiny_source(missing))
    with pytest.raises(ReglmError) as info:
        download("tiny", data_dir=tmp_path / "cache")
    assert missing.as_uri() in str(info.value) and "--data-dir" in str(info.value)
    assert cache_listing(tmp_path / "cache") == []


def test_resolve_dispatch(tmp_path, monkeypatch) -> None:
    with pytest.raises(ReglmError, match="ptb, wikitext-2, wikitext-103, synthetic"):
        resolve("no-such-corpus")
    with pytest.raises(ReglmError, match="unknown built-in corpus"):
        download("no-such-corpus")
    custom = tmp_path / "mine"
    custom.mkdir()
    for split, text in TEXTS.items():
        (custom / f"{split}.txt").write_text(text, encoding="utf-8")
    corpus = resolve(str(custom), min_freq=2)
    assert corpus.name == "mine" and corpus.vocab.unk_id is not None
    synthetic = resolve("synthetic", data_dir=tmp_path / "cache", synthetic_seed=3, synthetic_sentences=80)
    assert synthetic.name == "synthetic" and synthetic.truth is not None
    assert synthetic.valid.numel() == 10 * 11
    assert (tmp_path / "cache" / "synthetic-3-80-10-10").is_dir()


def test_url_table_is_complete() -> None:
    assert set(datasets.SOURCES) == {"ptb", "wikitext-2", "wikitext-103"}
    assert SOURCES["ptb"].url == "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
    assert SOURCES["wikitext-103"].sha256 is None
    assert SOURCES["wikitext-103"].tokens == (103_227_021, 217_646, 245_569)
    for source in SOURCES.values():
        assert set(source.members) == {"train", "valid", "test"}
