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
        members={split: (member,) for split, member in MEMBERS.items()},
        tokens=(10, 3, 2),
        vocab_size=4,
        sha256={s: sha(t) for s, t in TEXTS.items()} if by_hash else None,
    )


def cache_listing(root: Path) -> list[str]:
    """Every path below ``root`` but the encoded-corpus cache (``encoded/``, written on first use)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.relative_to(root).parts[0] != "encoded")


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
    with pytest.raises(ReglmError, match="ptb, wikitext-2, wikitext-103, lm1b, synthetic"):
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
    assert (tmp_path / "cache" / "synthetic-stream-3-80-10-10").is_dir()


def test_url_table_is_complete() -> None:
    assert set(datasets.SOURCES) == {"ptb", "wikitext-2", "wikitext-103", "lm1b"}
    assert SOURCES["ptb"].url == "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
    assert SOURCES["wikitext-103"].sha256 is None
    assert SOURCES["wikitext-103"].tokens == (103_227_021, 217_646, 245_569)
    for source in SOURCES.values():
        assert set(source.members) == {"train", "valid", "test"}


def test_billion_word_source_is_the_published_release() -> None:
    lm1b = SOURCES["lm1b"]
    assert lm1b.url == "http://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
    assert (lm1b.archive_bytes, lm1b.archive_sha256) == (
        1_792_209_805,
        "01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e",
    )
    train = lm1b.members["train"]
    assert (
        len(train) == 99
        and train[0].endswith("training-monolingual.tokenized.shuffled/news.en-00001-of-00100")
        and train[-1].endswith("news.en-00099-of-00100")
    )
    assert lm1b.members["test"][0].endswith("heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050")
    assert lm1b.members["valid"][0].endswith("heldout-monolingual.tokenized.shuffled/news.en.heldout-00001-of-00050")
    assert lm1b.tokens == (798_949_912, None, 159_658) and lm1b.min_freq == 3 and lm1b.sentences


SHARDS = {"train": ["a b c\n", "b c a\n", "a\n"], "valid": ["a b\n"], "test": ["c z\n"]}


def test_a_sharded_release_is_joined_in_order_checked_and_cut_at_its_min_freq(monkeypatch, tmp_path) -> None:
    """The billion-word shape: train is several members (stored out of order in the archive),
    the archive's sha256 is checked, counts where published, the benchmark's min_freq."""
    archive = tmp_path / "release.tar.gz"
    names = {split: [f"r13/{split}/part-{i}" for i in range(len(parts))] for split, parts in SHARDS.items()}
    with tarfile.open(archive, "w:gz") as tf:
        for split in ("test", "train", "valid"):
            for member, text in reversed(list(zip(names[split], SHARDS[split]))):
                info = tarfile.TarInfo(member)
                info.size = len(text)
                tf.addfile(info, io.BytesIO(text.encode()))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    source = Source(
        url=archive.as_uri(),
        members={split: tuple(m) for split, m in names.items()},
        tokens=(10, None, 3),
        vocab_size=0,
        archive_sha256=digest,
        archive_bytes=archive.stat().st_size,
        min_freq=3,
        sentences=True,
    )
    monkeypatch.setitem(SOURCES, "shards", source)
    target = download("shards", data_dir=tmp_path / "cache")
    assert (target / "train.txt").read_text() == "".join(SHARDS["train"])
    corpus = resolve("shards", data_dir=tmp_path / "cache")
    assert corpus.vocab.itos == ["<unk>", "<eos>", "a"] and corpus.vocab.counts == [4, 3, 3], (
        "b and c, seen twice, fall below the benchmark's cut"
    )
    assert corpus.test.tolist() == [0, 0, 1]
    assert resolve("shards", data_dir=tmp_path / "cache", min_freq=5).vocab.itos == ["<unk>", "<eos>"], (
        "min_freq cuts further"
    )
    monkeypatch.setitem(SOURCES, "shards", dataclasses.replace(source, archive_sha256="0" * 64))
    with pytest.raises(ReglmError, match="damaged or has changed.*sha256"):
        download("shards", data_dir=tmp_path / "other")
    assert cache_listing(tmp_path / "other") == []
    monkeypatch.setitem(SOURCES, "shards", dataclasses.replace(source, tokens=(10, None, 4)))
    with pytest.raises(ReglmError, match=r"test\.txt has 3 tokens, the published file 4"):
        download("shards", data_dir=tmp_path / "third")
