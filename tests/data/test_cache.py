"""The encoded-corpus cache: the same ids as reading the text, invalidation, damage, locking, bad input, views."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from reglm.data import cache, cache_encode, encoding
from reglm.data.cache import cache_root, id_dtype, load_cached, verify
from reglm.data.corpus import CacheInfo, Corpus, encode_file, load_directory, read_tokens
from reglm.data.datasets import resolve
from reglm.data.vocab import EOS, UNK
from reglm.data.windows import BlockPlan, StreamPlan
from reglm.errors import ReglmError
from reglm.train.setup import require_same_data, session_record

SPLITS = ("train", "valid", "test")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGLM_DATA_DIR", str(tmp_path / "cache"))


def write_corpus(root: Path, texts: dict[str, str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        (root / f"{split}.txt").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return root


def awkward_text(seed: int, lines: int) -> str:
    """Lines of words separated by every kind of whitespace str.split knows, with long words (past
    the 8- and 15-byte keys), words equal up to byte 16, non-ASCII and control characters inside
    words, literal <eos> / <unk>, blank lines and CRLF."""
    rng = random.Random(seed)
    spaces = [
        " ",
        "  ",
        "\t",
        "\r",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x1f",
        "\x85",
        "\xa0",
        "\u1680",
        "\u2003",
        "\u2028",
        "\u2029",
        "\u202f",
        "\u205f",
        "\u3000",
    ]
    words = [
        "the",
        "a",
        "ünïcödé",
        "\u2013dash",
        "x\x01y",
        EOS,
        UNK,
        "=",
        "verylongword" * 3,
        "0123456789abcdefXY",
        "0123456789abcdefXZ",
        "日本語",
    ]
    words += [f"w{rng.randrange(400)}" for _ in range(60)]
    out = []
    for _ in range(lines):
        if rng.random() < 0.15:
            out.append(rng.choice(["", " ", "\t"]))
            continue
        out.append(rng.choice(spaces).join(rng.choice(words) for _ in range(rng.randint(1, 12))))
    return "\n".join(out).replace("\n", "\r\n", 3)


def reference(path: Path, vocab: object) -> list[int]:
    """The rule read line by line in Python (read_tokens), through the vocabulary's dict."""
    return [vocab.stoi.get(t, vocab.unk_id) for t in read_tokens(path)]  # type: ignore[attr-defined]


def test_fast_reader_is_the_line_rule_on_awkward_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoding, "CHUNK_BYTES", 97)  # many pieces, lines longer than a piece
    root = write_corpus(
        tmp_path / "c",
        {
            "train": "\ufeff" + awkward_text(0, 300),
            "valid": awkward_text(1, 60) + "\nno final newline",
            "test": awkward_text(2, 40),
        },
    )
    got = load_directory(root)
    vocab = got.vocab
    tokens = read_tokens(root / "train.txt")
    assert vocab.decode(got.train.tolist()) == tokens
    assert sorted(vocab.counts, reverse=True) == vocab.counts and sum(vocab.counts) == len(tokens)
    for split in ("valid", "test"):
        assert got.split(split).tolist() == reference(root / f"{split}.txt", vocab)


def test_colliding_hashes_never_merge_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Words longer than 15 bytes are matched by a hash and then their bytes: with every hash
    forced equal, words sharing their first 8 bytes stay apart."""
    monkeypatch.setattr(encoding, "_mix", lambda z: np.zeros_like(z))
    words = [f"prefix00-{i:03d}-and-more-bytes" for i in range(40)] + ["prefix00-short", "prefix00"]
    text = "\n".join(" ".join(random.Random(i).sample(words, 20)) for i in range(30)) + "\n"
    root = write_corpus(tmp_path / "c", {"train": text, "valid": text, "test": text})
    got = load_directory(root)
    assert got.vocab.decode(got.train.tolist()) == read_tokens(root / "train.txt")
    assert len(got.vocab) == len(words) + 1


def test_cache_hit_gives_the_ids_of_a_fresh_encode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_corpus(
        tmp_path / "c", {"train": awkward_text(3, 400), "valid": awkward_text(4, 50), "test": awkward_text(5, 50)}
    )
    fresh = load_directory(root, min_freq=2)
    built = load_cached(root, min_freq=2)
    manifest = (built.cache.path / "manifest.json").stat().st_mtime_ns
    hit = load_cached(root, min_freq=2)
    assert (hit.cache.path / "manifest.json").stat().st_mtime_ns == manifest, "a hit rebuilds nothing"
    assert capsys.readouterr().err == ""
    for corpus in (built, hit):
        assert corpus.vocab == fresh.vocab and corpus.cache.dtype == "uint8"
        for split in SPLITS:
            ids = corpus.split(split)
            assert ids.dtype == torch.int32 and torch.equal(ids.long(), fresh.split(split))
    assert hit.cache == built.cache and hit.cache.path.parent == cache_root()
    assert load_cached(root).cache.path != hit.cache.path, "other settings, another entry"


def test_large_vocabulary_is_mapped_in_place_and_views_do_not_copy(tmp_path: Path) -> None:
    """Past 65,536 ids the files are int32 and the tensors are the mapping itself; the stream
    and block views of the training plans read it without a copy."""
    words = np.array([f"t{i}" for i in range(70_000)])[np.random.default_rng(0).permutation(70_000)]
    train = "\n".join(" ".join(words[i::7]) for i in range(7)) + "\n"
    root = write_corpus(tmp_path / "big", {"train": train, "valid": "t1 t2\n", "test": "t3\n"})
    corpus = load_cached(root)
    assert (
        corpus.cache.dtype == "int32" and (corpus.cache.path / "train.ids").stat().st_size == 4 * corpus.train.numel()
    )
    assert corpus.train.is_shared(), "a file mapping, not a copy in memory"
    ids = corpus.train
    plan = StreamPlan(ids, 10, "trim")
    assert plan.data.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr()
    window = plan.window(0, 5)
    assert window.inputs.dtype == torch.long and torch.equal(
        window.inputs, ids[: plan.data.numel()].view(10, -1)[:, :5].long()
    )
    assert BlockPlan(ids, 64, 4, seed=0).ids.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr()


def test_touched_or_changed_source_invalidates_the_entry(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_corpus(tmp_path / "c", {"train": "a b c\nb c\n", "valid": "a c\n", "test": "b\n"})
    first = load_cached(root)
    stat = (root / "valid.txt").stat()
    os.utime(root / "valid.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = load_cached(root)
    assert "valid.txt changed since it was encoded" in capsys.readouterr().err
    assert touched.cache.manifest_hash == first.cache.manifest_hash, "the same text encodes to the same hash"
    (root / "valid.txt").write_text("a b\n", encoding="utf-8")
    changed = load_cached(root)
    assert changed.cache.manifest_hash != first.cache.manifest_hash and changed.valid.tolist() == [
        changed.vocab.stoi[w] for w in ("a", "b", EOS)
    ]


def test_damaged_entries_are_detected_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from reglm.cli import main

    root = write_corpus(tmp_path / "c", {"train": "a b c\nb c a\n" * 50, "valid": "a c\n", "test": "b\n"})
    good = load_cached(root)
    expected = good.train.clone()
    ids_file = good.cache.path / "train.ids"
    with open(ids_file, "r+b") as f:
        f.truncate(ids_file.stat().st_size - 2)
    again = load_cached(root)
    assert "truncated" in capsys.readouterr().err and torch.equal(again.train, expected)
    data = bytearray(ids_file.read_bytes())
    data[10] ^= 1
    ids_file.write_bytes(bytes(data))
    assert verify(good.cache.path) == ["train.ids"]
    assert main(["data", "prepare", str(root)]) == 0
    err = capsys.readouterr().err
    assert "differ from its manifest" in err and verify(good.cache.path) == []
    (good.cache.path / "manifest.json").write_text("{not json", encoding="utf-8")
    assert torch.equal(load_cached(root).train, expected) and "unreadable" in capsys.readouterr().err


def _prepare(root: str, cache_dir: str, log: str) -> None:
    """A process that reads the corpus with a slow build (so that two overlap); it records every
    build it does in ``log``."""
    os.environ["REGLM_DATA_DIR"] = cache_dir
    encode = cache.encode_words

    def slow(*args: object, **kwargs: object) -> object:
        with open(log, "a") as f:
            f.write("build\n")
        import time

        time.sleep(0.5)
        return encode(*args, **kwargs)

    cache.encode_words = slow
    corpus = load_cached(root)
    np.save(f"{log}.{os.getpid()}.npy", corpus.train.numpy())


def test_two_processes_preparing_at_once_build_once(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "c", {"train": "a b c\nb c a\n" * 20, "valid": "a c\n", "test": "b\n"})
    log = tmp_path / "builds"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_prepare, args=(str(root), os.environ["REGLM_DATA_DIR"], str(log))) for _ in range(2)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert log.read_text().count("build") == 1, "one builds, the other waits and maps the result"
    results = [np.load(p) for p in tmp_path.glob("builds.*.npy")]
    expected = load_directory(root).train.numpy()
    assert len(results) == 2 and all(np.array_equal(r, expected) for r in results)


def test_unwritable_cache_and_full_disk_leave_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from reglm.cli import main

    root = write_corpus(tmp_path / "c", {"train": "a b c\nb c\n" * 100, "valid": "a c\n", "test": "b\n"})
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("REGLM_DATA_DIR", str(blocker / "cache"))
    assert main(["data", "prepare", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("reglm: error: cannot write the encoded cache") and "REGLM_DATA_DIR" in err
    monkeypatch.setenv("REGLM_DATA_DIR", str(tmp_path / "cache"))
    write = cache_encode.IdFile.write

    def fills_up(self: object, values: np.ndarray) -> None:
        if self.path.name == "valid.ids":  # type: ignore[attr-defined]
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, values)  # type: ignore[arg-type]

    monkeypatch.setattr(cache_encode.IdFile, "write", fills_up)
    with pytest.raises(ReglmError, match="No space left on device.*free some space"):
        load_cached(root)
    assert (
        sorted(p.name for p in cache_root().iterdir()) == [next(cache_root().iterdir()).name]
        and next(cache_root().iterdir()).suffix == ".lock"
    )
    monkeypatch.setattr(cache_encode.IdFile, "write", write)
    assert load_cached(root).train.numel() == 700


def test_id_dtype_is_the_smallest_that_holds_the_vocabulary() -> None:
    assert [id_dtype(n) for n in (2, 256, 257, 65_536, 65_537, 2**31)] == [
        "uint8",
        "uint8",
        "uint16",
        "uint16",
        "int32",
        "int32",
    ]
    with pytest.raises(ReglmError, match="more than an int32 id file holds.*data.max_vocab"):
        id_dtype(2**31 + 1)


def test_a_fixed_vocabulary_reuses_the_entry_that_built_it(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "c", {"train": "a b c a\nb c d\n", "valid": "a x\n", "test": "d\n"})
    built = load_cached(root, min_freq=2)
    again = load_cached(root, min_freq=2, vocab=built.vocab)
    assert again.cache.path == built.cache.path and again.vocab is built.vocab
    other = load_directory(root, max_vocab=3).vocab
    fixed = load_cached(root, min_freq=2, vocab=other)
    assert fixed.cache.path != built.cache.path and fixed.vocab is other
    assert fixed.valid.tolist() == encode_file(root / "valid.txt", other).tolist()


def test_subword_corpora_are_cached_too(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    root = write_corpus(
        tmp_path / "c",
        {"train": "lower lowest newer newest\nwider widest\n" * 20, "valid": "lowest newer\n", "test": "wide\n"},
    )
    fresh = load_directory(root, tokenizer="bpe", bpe_vocab_size=40)
    built = load_cached(root, tokenizer="bpe", bpe_vocab_size=40)
    hit = load_cached(root, tokenizer="bpe", bpe_vocab_size=40)
    assert hit.vocab == fresh.vocab and hit.tokenizer is not None and hit.cache.path == built.cache.path
    for split in SPLITS:
        assert torch.equal(hit.split(split).long(), fresh.split(split)) and torch.equal(
            hit.split_word_ends(split), fresh.split_word_ends(split)
        )


def test_stream_and_block_views_over_cached_ptb_are_batchify_and_get_batch(shared_data: Path) -> None:
    """The AWD-LSTM reference's batchify / get_batch (time-major there, batch-first here) and
    its blocks, against the plans over the cached PTB; the built-in counts are unchanged."""
    corpus = resolve("ptb", data_dir=shared_data)
    assert corpus.cache is not None and (
        corpus.train.numel(),
        corpus.valid.numel(),
        corpus.test.numel(),
        len(corpus.vocab),
    ) == (929_589, 73_760, 82_430, 10_000)
    assert torch.equal(corpus.train.long(), load_directory(shared_data / "ptb").train)
    data = corpus.train.long()
    bsz, bptt = 20, 35
    source = data.narrow(0, 0, data.size(0) // bsz * bsz).view(bsz, -1).t().contiguous()
    plan = StreamPlan(corpus.train, bsz, "trim")
    for i, window in zip(range(0, 200 * bptt, bptt), plan.windows(bptt)):
        seq_len = min(bptt, len(source) - 1 - i)
        assert torch.equal(window.inputs, source[i : i + seq_len].t()) and torch.equal(
            window.targets.t().reshape(-1), source[i + 1 : i + 1 + seq_len].reshape(-1)
        )
    blocks = BlockPlan(corpus.train, 512, 8, seed=3)
    for index in (0, blocks.batches - 1):
        window = blocks.batch(2, index)
        rows = blocks.order(2)[index * 8 : (index + 1) * 8]
        expected = torch.stack([data[b * 512 : b * 512 + 513] for b in rows.tolist()])
        assert torch.equal(window.inputs, expected[:, :-1]) and torch.equal(window.targets, expected[:, 1:])


def test_several_processes_encode_parts_to_the_same_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A training file cut into parts (one per worker, forked) merges into the ids of one pass;
    an error in a later part names the line of the whole file."""
    monkeypatch.setattr(cache_encode, "PARALLEL_BYTES", 256)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    root = write_corpus(
        tmp_path / "c", {"train": awkward_text(6, 300), "valid": awkward_text(7, 30), "test": awkward_text(8, 30)}
    )
    assert len(cache_encode._parts(root / "train.txt")) == 4
    fresh, got = load_directory(root, max_vocab=300), load_cached(root, max_vocab=300)
    assert got.vocab == fresh.vocab and all(torch.equal(got.split(s).long(), fresh.split(s)) for s in SPLITS)
    lines = (root / "train.txt").read_bytes().split(b"\n")
    lines[250] += b" \xff"
    (root / "train.txt").write_bytes(b"\n".join(lines))
    with pytest.raises(ReglmError, match="not valid UTF-8 at line 251"):
        load_cached(root)


def test_run_directories_record_the_entry_and_resume_refuses_another(tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "c", {"train": "a b\n", "valid": "a\n", "test": "b\n"})
    corpus = load_cached(root)
    record = session_record(torch.device("cpu"), corpus)
    assert (
        record["data"] == {"name": "c", "cache": str(corpus.cache.path), "manifest_hash": corpus.cache.manifest_hash}
        and "torch" in record
    )
    state = tmp_path / "run" / "state.pt"
    require_same_data(corpus.cache.manifest_hash, corpus, state)
    require_same_data(None, corpus, state)  # a run directory from before the cache
    other = Corpus(
        corpus.name,
        corpus.vocab,
        corpus.train,
        corpus.valid,
        corpus.test,
        cache=CacheInfo(corpus.cache.path, "0" * 64, "uint8"),
    )
    with pytest.raises(ReglmError, match="trained on the encoded corpus .* now encodes to 0000"):
        require_same_data(corpus.cache.manifest_hash, other, state)


def test_resume_refuses_a_corpus_that_encodes_differently(tmp_path: Path) -> None:
    from reglm.config import build_config
    from reglm.train.checkpoint import load_state
    from reglm.train.run import resume, train

    rng = random.Random(0)
    texts = {
        split: "\n".join(" ".join(rng.choice("abcde") for _ in range(6)) for _ in range(n)) + "\n"
        for split, n in (("train", 120), ("valid", 20), ("test", 20))
    }
    root = write_corpus(tmp_path / "c", texts)
    run = tmp_path / "run"
    train(
        build_config("tiny", [f"data.name={root}", "train.epochs=1", "train.finetune=false", "train.max_steps=2"]),
        run,
        progress=False,
    )
    recorded = load_state(run / "state.pt")["data_manifest"]
    assert recorded == load_cached(root).cache.manifest_hash
    assert json.loads((run / "environment.json").read_text())[0]["data"]["manifest_hash"] == recorded
    (root / "valid.txt").write_text(
        texts["valid"][::-1].strip() + "\n", encoding="utf-8"
    )  # the same words, another text
    with pytest.raises(ReglmError, match="trained on the encoded corpus"):
        resume(run, progress=False)
