"""Corpus reading: the <eos>-per-line rule, vocabulary from train, bad input, the real benchmark counts."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import pytest
import torch

from reglm.data.corpus import Corpus, corpus_stats, encode_file, load_directory, read_tokens
from reglm.data.vocab import EOS, UNK
from reglm.errors import ReglmError


def write_corpus(root: Path, train: str, valid: str, test: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


def test_read_tokens_rule(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbf the cat \n\n  sat\ton\r\nthe  mat")
    assert read_tokens(path) == ["the", "cat", EOS, EOS, "sat", "on", EOS, "the", "mat", EOS]
    path.write_bytes(b" \n")
    assert read_tokens(path) == [EOS]
    path.write_bytes(b"")
    assert read_tokens(path) == []


def test_load_directory_small(tmp_path) -> None:
    root = write_corpus(tmp_path / "tiny", "a b a\nc a\n\n", "a c\n", "b\n")
    corpus = load_directory(root)
    assert isinstance(corpus, Corpus) and corpus.name == "tiny" and corpus.truth is None
    assert corpus.vocab.itos == [EOS, "a", "b", "c"]  # a tie at 3: "<eos>" < "a"
    assert corpus.vocab.counts == [3, 3, 1, 1]
    v = corpus.vocab.stoi
    assert corpus.train.tolist() == [v["a"], v["b"], v["a"], v[EOS], v["c"], v["a"], v[EOS], v[EOS]]
    assert corpus.valid.tolist() == [v["a"], v["c"], v[EOS]]
    assert corpus.test.tolist() == [v["b"], v[EOS]]
    assert corpus.train.dtype == torch.long and corpus.train.dim() == 1
    assert corpus.split("valid") is corpus.valid
    stats = corpus_stats(corpus)
    assert stats["tokens"] == {"train": 8, "valid": 3, "test": 2}
    assert stats["vocab_size"] == 4 and stats["unk_rate"]["valid"] == 0.0 and not stats["has_unk"]


def test_vocabulary_comes_from_train_only_and_oov_maps_to_unk(tmp_path) -> None:
    root = write_corpus(tmp_path / "c", "a b <unk> a\n", "a zz b qq\n", "a\n")
    corpus = load_directory(root, name="custom")
    assert corpus.name == "custom"
    assert "zz" not in corpus.vocab
    unk = corpus.vocab.unk_id
    assert corpus.valid.tolist() == [corpus.vocab.stoi["a"], unk, corpus.vocab.stoi["b"], unk, corpus.vocab.eos_id]
    assert corpus_stats(corpus)["unk_rate"]["valid"] == pytest.approx(2 / 5)


def test_min_freq_and_max_vocab_create_unk(tmp_path) -> None:
    root = write_corpus(tmp_path / "c", "a a a b b c\nd\n", "e a\n", "c\n")
    corpus = load_directory(root, min_freq=2)
    assert corpus.vocab.itos == ["a", EOS, UNK, "b"]
    assert corpus.vocab.counts == [3, 2, 2, 2]
    unk = corpus.vocab.unk_id
    assert corpus.train.tolist()[5] == unk and corpus.valid.tolist()[0] == unk and corpus.test.tolist()[0] == unk
    corpus = load_directory(root, max_vocab=3)
    assert corpus.vocab.itos == [UNK, "a", EOS]
    assert corpus.vocab.counts == [4, 3, 2]


def test_missing_directory_and_split(tmp_path) -> None:
    with pytest.raises(ReglmError, match="nowhere.*does not exist"):
        load_directory(tmp_path / "nowhere")
    root = write_corpus(tmp_path / "c", "a\n", "a\n", "a\n")
    (root / "test.txt").unlink()
    with pytest.raises(ReglmError, match=r"test\.txt is missing"):
        load_directory(root)


@pytest.mark.parametrize("text", ["", "\n \n\t\n"])
def test_empty_split(tmp_path, text: str) -> None:
    root = write_corpus(tmp_path / "c", "a b\n", text, "a\n")
    with pytest.raises(ReglmError, match=r"valid\.txt holds no words"):
        load_directory(root)


def test_invalid_utf8_names_file_and_line(tmp_path) -> None:
    root = write_corpus(tmp_path / "c", "a b\n", "a\n", "a\n")
    (root / "train.txt").write_bytes(b"a b\nok line\nbad \xff\xfe byte\nmore\n")
    with pytest.raises(ReglmError, match=r"train\.txt is not valid UTF-8 at line 3; re-encode"):
        load_directory(root)
    with pytest.raises(ReglmError, match="line 3"):
        read_tokens(root / "train.txt")


def test_oov_without_unk_names_word_file_and_line(tmp_path) -> None:
    root = write_corpus(tmp_path / "c", "a b\nb a\n", "a\nb a\n\nb strange a\n", "a\n")
    with pytest.raises(ReglmError) as info:
        load_directory(root)
    message = str(info.value)
    assert "'strange'" in message and "valid.txt line 4" in message
    assert "--min-freq" in message and "<unk>" in message


def test_encode_file_with_fixed_vocab(tmp_path) -> None:
    root = write_corpus(tmp_path / "c", "a b\n", "b\n", "a\n")
    vocab = load_directory(root).vocab
    other = tmp_path / "other.txt"
    other.write_text("b a b\n", encoding="utf-8")
    assert encode_file(other, vocab).tolist() == [vocab.stoi["b"], vocab.stoi["a"], vocab.stoi["b"], vocab.eos_id]


# ------------------------------------------------------------------ the real benchmarks


@functools.lru_cache(maxsize=None)
def _load(path: str) -> Corpus:
    return load_directory(path)


PUBLISHED = {
    "ptb": ((929_589, 73_760, 82_430), 10_000, 45_020),
    "wikitext-2": ((2_088_628, 217_646, 245_569), 33_278, 54_625),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts(shared_data: Path, name: str) -> None:
    corpus = _load(str(shared_data / name))
    (n_train, n_valid, n_test), size, train_unk = PUBLISHED[name]
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (n_train, n_valid, n_test)
    assert len(corpus.vocab) == size
    assert corpus.vocab.unk_id is not None
    stats = corpus_stats(corpus)
    assert stats["tokens"] == {"train": n_train, "valid": n_valid, "test": n_test}
    assert stats["unk_rate"]["train"] == pytest.approx(train_unk / n_train)
    counts = corpus.vocab.counts
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(counts) == n_train
    assert int((corpus.train == corpus.vocab.eos_id).sum()) == counts[corpus.vocab.eos_id]


def test_ptb_ids_match_an_independent_reading(shared_data: Path) -> None:
    corpus = _load(str(shared_data / "ptb"))
    text = (shared_data / "ptb" / "train.txt").read_text(encoding="utf-8")
    tokens = [tok for line in text.split("\n")[:-1] for tok in line.split() + [EOS]]
    assert corpus.vocab.decode(corpus.train.tolist()) == tokens
    counter = Counter(tokens)
    assert [counter[t] for t in corpus.vocab.itos] == corpus.vocab.counts
    assert corpus.vocab.itos[:3] == ["the", UNK, EOS]
