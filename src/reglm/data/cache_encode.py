"""Encoding a corpus into the id files of an encoded-corpus cache entry (:mod:`reglm.data.cache`).

The word encoder (:func:`reglm.data.encoding.encode_chunks`): the word rule in numpy over 8 MB pieces, the
word types in a numpy hash table; the training split is counted and written with provisional ids
in one pass, then remapped to the vocabulary's ids through a table (in place when the ids are
int32). Sub-word corpora are segmented in memory as :func:`reglm.data.corpus.load_directory`
does, then written.

A training file of at least :data:`PARALLEL_BYTES` is encoded by several forked processes, one
part each, whose word-type tables are merged so that the ids are the same as from one process.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from reglm.data.bpe import BPEVocab
from reglm.data.corpus import EOS, SPLITS, _load_subword
from reglm.data.encoding import WordTypes, encode_chunks
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError

DTYPES = (("uint8", 1 << 8), ("uint16", 1 << 16), ("int32", 1 << 31))
"""Id-file dtypes, smallest first, with the number of ids each holds."""
_REMAP_TOKENS = 1 << 22
"""Ids remapped per step when the training split's provisional ids become vocabulary ids."""


def id_dtype(vocab_size: int) -> str:
    """The smallest dtype of :data:`DTYPES` that holds ids ``0 .. vocab_size - 1``."""
    for dtype, room in DTYPES:
        if vocab_size <= room:
            return dtype
    raise ReglmError(
        f"the vocabulary has {vocab_size:,} entries, more than an int32 id file holds ({DTYPES[-1][1]:,}); "
        "raise data.min_freq or set data.max_vocab"
    )


class IdFile:
    """An id file being written: arrays appended, their sha256 kept, fsynced on close (a part
    file of provisional ids, read back once and deleted, is neither hashed nor fsynced)."""

    def __init__(self, path: Path, final: bool = True) -> None:
        self.path, self.final = path, final
        self.file: IO[bytes] = open(path, "xb")
        self.digest = hashlib.sha256()
        self.count = 0

    def write(self, values: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(values)).cast("B")
        self.file.write(data)
        if self.final:
            self.digest.update(data)
        self.count += values.size

    def close(self) -> str:
        self.file.flush()
        if self.final:
            os.fsync(self.file.fileno())
        self.file.close()
        return self.digest.hexdigest()


def _write(path: Path, values: np.ndarray) -> str:
    out = IdFile(path)
    try:
        out.write(values)
    finally:
        digest = out.close()
    return digest


def encode_words(
    staging: Path,
    directory: Path,
    name: str,
    vocab: Vocab | None,
    min_freq: int,
    max_vocab: int | None,
    progress: bool,
) -> tuple[Vocab, dict[str, Any]]:
    """Write the three id files of a word corpus; returns the vocabulary and the splits' manifest entries."""
    splits: dict[str, Any] = {}
    if vocab is None:
        vocab, splits["train"] = _encode_train(staging, directory / "train.txt", name, min_freq, max_vocab, progress)
    dtype = id_dtype(len(vocab))
    types = WordTypes.of(vocab.itos)
    for split in SPLITS:
        if split in splits:
            continue
        out = IdFile(staging / f"{split}.ids")
        try:
            for ids in encode_chunks(
                directory / f"{split}.txt",
                types,
                vocab.eos_id,
                vocab.unk_id,
                dtype=dtype,
                progress=progress,
                desc=f"{name} {split}",
            ):
                out.write(ids)
        finally:
            digest = out.close()
        splits[split] = {"tokens": out.count, "dtype": dtype, "sha256": digest}
    return vocab, splits


def _encode_train(
    staging: Path, path: Path, name: str, min_freq: int, max_vocab: int | None, progress: bool
) -> tuple[Vocab, dict[str, Any]]:
    """Count and encode the training split (provisional int32 ids on disk, one part per worker),
    build the vocabulary, then remap every part through its table into ``train.ids``.

    A file of at least :data:`PARALLEL_BYTES` is cut at line starts into one part per core (up to
    :data:`MAX_WORKERS`); each part but the first is encoded by a forked process with its own
    word-type table, and the tables are merged into the first one's afterwards, so the ids are
    the same as from one process."""
    bounds = _parts(path)
    results: list[tuple[list[str], np.ndarray, int]] = []
    parts = [staging / f"train.part{k}" for k in range(len(bounds) - 1)]
    context = multiprocessing.get_context("fork")
    workers = []
    try:
        for k in range(1, len(parts)):
            receive, send = context.Pipe(duplex=False)
            worker = context.Process(
                target=_part_worker, args=(path, bounds[k], bounds[k + 1], parts[k], send), daemon=True
            )
            worker.start()
            send.close()
            workers.append((worker, receive))
        types = WordTypes.of([EOS])
        counts, words = _encode_part(path, bounds[0], bounds[1], parts[0], types, progress, f"{name} train")
        for worker, receive in workers:
            try:
                outcome = receive.recv()
            except EOFError:
                outcome = ("crash", f"the encoding process of a part of {path} ended with exit code {worker.exitcode}")
            worker.join()
            if outcome[0] == "error":
                raise ReglmError(outcome[1])
            if outcome[0] == "oserror":
                raise OSError(*outcome[1])
            if outcome[0] == "crash":
                raise RuntimeError(outcome[1])
            results.append(outcome[1])
    finally:
        for worker, _ in workers:
            if worker.is_alive():
                worker.terminate()
                worker.join()
    mappings = [np.arange(types.size)]
    for part_types, part_counts, part_words in results:
        mappings.append(types.merge(part_types))
        counts = np.pad(counts, (0, types.size - counts.size))
        counts[mappings[-1]] += part_counts
        words += part_words
    if words == 0:
        raise ReglmError(f"{path} holds no words (it is empty or blank); put the split's text in it")
    vocab, table = Vocab.from_counts(types.tokens(), counts, min_freq, max_vocab)
    dtype = id_dtype(len(vocab))
    final = IdFile(staging / "train.ids")
    try:
        for part, mapping in zip(parts, mappings):
            local = table[mapping].astype(dtype)
            ids = np.memmap(part, dtype=np.int32, mode="r") if part.stat().st_size else np.zeros(0, dtype=np.int32)
            for lo in range(0, ids.size, _REMAP_TOKENS):
                final.write(np.take(local, ids[lo : lo + _REMAP_TOKENS], mode="wrap"))  # in range: no bounds check
            del ids
            part.unlink()
    finally:
        sha = final.close()
    return vocab, {"tokens": final.count, "dtype": dtype, "sha256": sha}


PARALLEL_BYTES = 1 << 26
"""Training files from 64 MiB on are encoded by several processes (smaller ones take seconds)."""
MAX_WORKERS = 8


def _parts(path: Path) -> list[int]:
    """Byte offsets (line starts) cutting ``path`` into one part per worker: ``[0, ..., size]``."""
    size = path.stat().st_size
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    workers = max(1, min(cores, MAX_WORKERS, size // PARALLEL_BYTES))
    bounds = [0]
    with open(path, "rb") as f:
        for k in range(1, workers):
            f.seek(k * size // workers)
            f.readline()
            if bounds[-1] < f.tell() < size:
                bounds.append(f.tell())
    return [*bounds, size]


def _encode_part(
    path: Path, start: int, stop: int, out_path: Path, types: WordTypes, progress: bool, desc: str
) -> tuple[np.ndarray, int]:
    """Encode bytes ``start .. stop`` of ``path`` with ``types`` growing; provisional int32 ids to
    ``out_path``. Returns the count of every type and how many words the part holds."""
    counts = np.zeros(0, dtype=np.int64)
    out = IdFile(out_path, final=False)
    pieces = encode_chunks(
        path,
        types,
        eos=0,
        grow=True,
        dtype=np.int32,
        progress=progress,
        desc=desc,
        start=start,
        stop=stop,
        require_words=False,
    )
    try:
        while True:
            try:
                ids = next(pieces)
            except StopIteration as end:
                return counts, end.value
            out.write(ids)
            counts = np.bincount(ids, minlength=types.size) + np.pad(counts, (0, types.size - counts.size))
    finally:
        out.close()


def _part_worker(path: Path, start: int, stop: int, out_path: Path, send: Any) -> None:
    """A forked process's part of :func:`_encode_train`: its outcome goes back through ``send``."""
    try:
        types = WordTypes.of([EOS])
        counts, words = _encode_part(path, start, stop, out_path, types, False, "")
        outcome: tuple[str, Any] = ("done", (types.tokens(), counts, words))
    except ReglmError as exc:
        outcome = ("error", str(exc))
    except OSError as exc:
        outcome = ("oserror", (exc.errno, exc.strerror, exc.filename))
    except BaseException as exc:  # reported to the parent, which raises it
        outcome = ("crash", f"{type(exc).__name__}: {exc}")
    send.send(outcome)
    send.close()


def encode_subwords(
    staging: Path, directory: Path, name: str, vocab: Vocab | None, bpe_vocab_size: int
) -> tuple[BPEVocab, dict[str, Any]]:
    """Segment a sub-word corpus in memory (:func:`reglm.data.corpus.load_directory`'s way) and write it."""
    corpus = _load_subword(directory, name, vocab, bpe_vocab_size)
    assert isinstance(corpus.vocab, BPEVocab) and corpus.word_ends is not None
    dtype = id_dtype(len(corpus.vocab))
    splits = {}
    for split in SPLITS:
        ids = corpus.split(split).numpy()
        splits[split] = {
            "tokens": int(ids.size),
            "dtype": dtype,
            "sha256": _write(staging / f"{split}.ids", ids.astype(dtype)),
            "ends_sha256": _write(staging / f"{split}.ends", corpus.word_ends[split].numpy().astype(np.uint8)),
        }
    return corpus.vocab, splits
