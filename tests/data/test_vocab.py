"""Vocab: frequency order with deterministic ties, <unk>/<eos> rules, encode, file round trip."""

from __future__ import annotations

from collections import Counter

import pytest

from reglm.data.vocab import EOS, UNK, UnknownWordError, Vocab
from reglm.errors import ReglmError


def test_order_is_descending_count_then_token() -> None:
    vocab = Vocab.build(Counter({"b": 3, "a": 3, "c": 5, EOS: 2, "d": 1}))
    assert vocab.itos == ["c", "a", "b", EOS, "d"]
    assert vocab.counts == [5, 3, 3, 2, 1]
    assert vocab.stoi == {"c": 0, "a": 1, "b": 2, EOS: 3, "d": 4}
    assert vocab.unk_id is None
    assert vocab.eos_id == 3
    assert len(vocab) == 5 and "a" in vocab and "z" not in vocab


def test_eos_always_present_even_unseen() -> None:
    vocab = Vocab.build(Counter({"x": 2}))
    assert vocab.itos == ["x", EOS]
    assert vocab.counts == [2, 0]


def test_min_freq_drops_words_into_unk_at_its_frequency_position() -> None:
    counter = Counter({"a": 10, "b": 4, "c": 1, "d": 1, "e": 1, "f": 2, EOS: 3})
    vocab = Vocab.build(counter, min_freq=2)
    # c, d, e (1 each) are dropped: <unk> gets 3 and ties with <eos> (3); "<eos>" < "<unk>"
    assert vocab.itos == ["a", "b", EOS, UNK, "f"]
    assert vocab.counts == [10, 4, 3, 3, 2]
    assert vocab.encode(["a", "c", "zzz", "f"]) == [0, 3, 3, 4]
    assert sum(vocab.counts) == sum(counter.values())


def test_max_vocab_counts_every_entry_including_unk() -> None:
    counter = Counter({w: 100 - i for i, w in enumerate("abcdefghij")})
    counter[EOS] = 50
    vocab = Vocab.build(counter, max_vocab=5)
    assert len(vocab) == 5
    # room for eos + unk + 3 words; dropped: d..j
    dropped = sum(counter[w] for w in "defghij")
    assert vocab.itos == [UNK, "a", "b", "c", EOS]
    assert vocab.counts == [dropped, 100, 99, 98, 50]


def test_max_vocab_that_fits_needs_no_unk() -> None:
    vocab = Vocab.build(Counter({"a": 3, "b": 2, EOS: 1}), max_vocab=3)
    assert vocab.itos == ["a", "b", EOS] and vocab.unk_id is None
    small = Vocab.build(Counter({"a": 3, "b": 2, EOS: 1}), max_vocab=2)
    assert small.itos == [UNK, EOS] and small.counts == [5, 1]


def test_unk_in_training_text_is_kept_with_its_count_plus_dropped() -> None:
    vocab = Vocab.build(Counter({"a": 5, UNK: 2, EOS: 1}))
    assert vocab.itos == ["a", UNK, EOS] and vocab.counts == [5, 2, 1]
    vocab = Vocab.build(Counter({"a": 5, UNK: 2, "b": 1, EOS: 1}), min_freq=2)
    assert vocab.itos == ["a", UNK, EOS] and vocab.counts == [5, 3, 1]


def test_min_freq_zero_keeps_unseen_words() -> None:
    counter = Counter({"a": 2, EOS: 1})
    counter["z"] += 0
    vocab = Vocab.build(counter, min_freq=0)
    assert vocab.itos == ["a", EOS, "z"] and vocab.counts == [2, 1, 0] and vocab.unk_id is None


def test_encode_without_unk_raises_key_error_with_word_and_position() -> None:
    vocab = Vocab.build(Counter({"a": 1, "b": 1}))
    assert vocab.encode(["b", "a", EOS]) == [vocab.stoi["b"], vocab.stoi["a"], vocab.eos_id]
    with pytest.raises(KeyError) as info:
        vocab.encode(["a", "b", "nope", "a"])
    assert isinstance(info.value, UnknownWordError)
    assert info.value.word == "nope" and info.value.position == 2


def test_save_load_round_trip(tmp_path) -> None:
    vocab = Vocab.build(Counter({"é": 4, "日本": 3, "a'b": 3, "<unk>": 1, EOS: 2}))
    path = tmp_path / "vocab.txt"
    (tmp_path / "vocab.txt").write_text("old content\n", encoding="utf-8")
    vocab.save(path)
    assert path.read_text(encoding="utf-8") == "é\t4\na'b\t3\n日本\t3\n<eos>\t2\n<unk>\t1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab.txt"]
    loaded = Vocab.load(path)
    assert loaded == vocab
    assert loaded.stoi == vocab.stoi and loaded.fingerprint() == vocab.fingerprint()


@pytest.mark.parametrize(
    ("content", "line"),
    [("a\t3\nb 2\n<eos>\t1\n", 2), ("a\t3\n<eos>\tx\n", 2), ("\n", 1), ("a\t1\t2\n<eos>\t1\n", 1)],
)
def test_load_malformed_names_file_and_line(tmp_path, content: str, line: int) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ReglmError, match=rf"{path}.*line {line}"):
        Vocab.load(path)


def test_load_rejects_duplicates_missing_eos_and_bad_bytes(tmp_path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("a\t3\na\t2\n<eos>\t1\n", encoding="utf-8")
    with pytest.raises(ReglmError, match="vocab.txt"):
        Vocab.load(path)
    path.write_text("a\t3\n", encoding="utf-8")
    with pytest.raises(ReglmError, match="<eos>"):
        Vocab.load(path)
    path.write_bytes(b"\xff\t3\n<eos>\t1\n")
    with pytest.raises(ReglmError, match="UTF-8"):
        Vocab.load(path)
    with pytest.raises(ReglmError, match="missing"):
        Vocab.load(tmp_path / "nothere.txt")


def test_fingerprint_depends_on_order_only() -> None:
    a = Vocab(["x", "y", EOS], [3, 2, 1])
    b = Vocab(["y", "x", EOS], [3, 2, 1])
    c = Vocab(["x", "y", EOS], [9, 9, 9])
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint() == c.fingerprint()
    assert a != c and a == Vocab(["x", "y", EOS], [3, 2, 1])
    assert len(a.fingerprint()) == 64
