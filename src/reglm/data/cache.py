"""The encoded-corpus cache: a corpus is encoded once into token-id files, later runs map them.

Where: ``<cache>/encoded/<name>-<key>/`` with ``<cache>`` = ``$REGLM_DATA_DIR``, else
``~/.cache/reglm`` (:func:`cache_root`). The ``data_dir`` of a built-in corpus only says where its
text is: a directory of offline copies may be read-only or shared, and reading it needs no write
access, so the encodings, which are per user, never go there. ``<key>`` is a hash of what fixes
the ids: the corpus directory's resolved path, the tokenizer and its options (``min_freq`` /
``max_vocab``, or ``bpe_vocab_size``), and the fingerprint of a vocabulary given instead of built.

An entry holds, per split, ``<split>.ids`` (the ids, little-endian, in the smallest dtype that
holds the vocabulary: uint8, uint16 or int32), for sub-word corpora ``<split>.ends`` (the word-end
mask, one byte per unit) and ``tokenizer.json``, then ``vocab.txt`` and ``manifest.json``:

* ``sources``: size and modification time (ns) of each text file when it was read; a file that
  differs (edited, replaced, touched) makes the entry stale and it is built again.
* ``identity``: the tokenizer, the vocabulary's fingerprint and size and, per split, its token
  count, dtype and sha256. Its hash is the **manifest hash** that a run directory records
  (``state.pt``, ``environment.json``); resume refuses a corpus whose hash differs. A rebuild of
  unchanged text gives the same hash (mtimes are not part of it).

Reading: the manifest, the sources' stat, each file's size and the vocabulary's fingerprint are
checked (milliseconds; no file is read through), then every id file is mapped with
``torch.from_file`` (copy-on-write, pages read on first touch and shared through the page cache by
every process on the machine). torch computes on no 16-bit or 8-bit integer index type, so the
ids of a uint8/uint16 file (vocabularies up to 65,536: PTB, WikiText-2, BPE) are widened to one
int32 copy in memory; an int32 file (WikiText-103, the billion-word benchmark) is used in place.
Every id is checked to lie inside the vocabulary on the way (one pass over the mapped file, as
fast as reading its pages), and the dtype against the one the vocabulary's size gives. A
truncated or resized file, an id out of range, a manifest that lies about a dtype or a count, a
damaged manifest or vocabulary is reported and the entry rebuilt (or, in a read-only cache,
refused with a ``reglm: error:`` naming it); a flipped byte that keeps an id in range is caught
by :func:`verify` (``reglm data prepare``), which re-hashes every file against the manifest.

Writing: an entry is built in a temporary sibling directory, every file fsynced, the manifest
last, and renamed into place; a failure (a full disk, a directory that is not writable) removes
the temporary directory and is a ReglmError, so no half-written entry is ever trusted. Builders
of one entry take an exclusive ``flock`` on ``<name>-<key>.lock`` beside it: a second process
waits, then finds the entry built and maps it; a builder removes the staging directories of its
entry that a killed build left. Readers take no lock, so a read-only cache that holds the entry
already works.

Encoding the id files is :mod:`reglm.data.cache_encode`.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reglm.data.bpe import BPEVocab
from reglm.data.cache_encode import encode_subwords, encode_words, id_dtype
from reglm.data.corpus import SPLITS, CacheInfo, Corpus, cache_dir, check_directory
from reglm.data.encoding import CHUNK_BYTES
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError
from reglm.io import temp_sibling, write_json, write_text

FORMAT = 1
MANIFEST = "manifest.json"
VOCAB = "vocab.json"
TOKENIZER = "tokenizer.json"
_TORCH = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32}


def cache_root() -> Path:
    """``$REGLM_DATA_DIR/encoded`` (or ``~/.cache/reglm/encoded``): where every encoded corpus lives."""
    return cache_dir() / "encoded"


def settings(
    directory: Path, tokenizer: str, min_freq: int, max_vocab: int | None, bpe_vocab_size: int, vocab: Vocab | None
) -> dict[str, Any]:
    """What fixes a corpus's ids besides its text: the key of its entry is a hash of this."""
    out: dict[str, Any] = {"format": FORMAT, "source": str(directory.resolve()), "tokenizer": tokenizer}
    if tokenizer == "word":
        out.update(min_freq=min_freq, max_vocab=max_vocab)
    else:
        out["bpe_vocab_size"] = bpe_vocab_size
    if vocab is not None:
        out["vocab"] = vocab.fingerprint()
        if isinstance(vocab, BPEVocab):
            out["merges"] = vocab.tokenizer_fingerprint()
    return out


def entry_path(name: str, spec: dict[str, Any]) -> Path:
    """The entry directory of ``spec`` (:func:`settings`) for a corpus called ``name``."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "corpus"
    return cache_root() / f"{label}-{key}"


def manifest_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def load_cached(
    directory: str | Path,
    name: str | None = None,
    min_freq: int = 1,
    max_vocab: int | None = None,
    vocab: Vocab | None = None,
    tokenizer: str = "word",
    bpe_vocab_size: int = 32000,
    progress: bool | None = None,
) -> Corpus:
    """The corpus of a directory (as :func:`reglm.data.corpus.load_directory` reads it, the same
    ids) from its cache entry, which is built first when it is missing, stale or damaged.

    With a fixed ``vocab`` the entry built with these options is used when its vocabulary has the
    same ids (and units), so evaluating a model reads the entry its training wrote; otherwise the
    corpus gets an entry of its own for that vocabulary. ``progress``: progress bars on stderr
    (default: when stderr is a terminal).
    """
    directory = Path(directory)
    tokenizer = check_directory(directory, tokenizer, min_freq, max_vocab, vocab)
    name = name or directory.resolve().name
    progress = sys.stderr.isatty() if progress is None else progress
    if vocab is not None:
        built = entry_path(name, settings(directory, tokenizer, min_freq, max_vocab, bpe_vocab_size, None))
        corpus = _open(built, directory, name, quiet=True)
        if not isinstance(corpus, str) and _same_vocab(corpus.vocab, vocab):
            corpus.vocab = vocab
            return corpus
    spec = settings(directory, tokenizer, min_freq, max_vocab, bpe_vocab_size, vocab)
    entry = entry_path(name, spec)
    corpus = _open(entry, directory, name)
    if not isinstance(corpus, str):
        return corpus
    with _locked(entry, name):
        corpus = _open(entry, directory, name, quiet=True)
        if isinstance(corpus, str):
            _remove_leftovers(entry)
            if progress:
                print(f"reglm: encoding {name} into {entry}", file=sys.stderr)
            built, manifest = _build(
                entry, spec, directory, name, tokenizer, min_freq, max_vocab, bpe_vocab_size, vocab, progress
            )
            corpus = _map_corpus(entry, manifest, name, built)
    if vocab is not None:
        corpus.vocab = vocab
    return corpus


def _same_vocab(have: Vocab, want: Vocab) -> bool:
    if have.fingerprint() != want.fingerprint():
        return False
    if isinstance(want, BPEVocab):
        return isinstance(have, BPEVocab) and have.tokenizer_fingerprint() == want.tokenizer_fingerprint()
    return True


# --------------------------------------------------------------------------------------- reading


def read_manifest(entry: Path) -> dict[str, Any] | str:
    """The manifest of ``entry``, or why it cannot be used (``"missing"`` when there is none)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"its {MANIFEST} is unreadable ({exc})"
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("identity"), dict)
    ):
        return f"its {MANIFEST} is not a format-{FORMAT} manifest"
    return manifest


def _stale(manifest: dict[str, Any], directory: Path) -> str | None:
    """Why the text of ``directory`` is not what ``manifest`` encoded, if it is not."""
    if manifest.get("settings", {}).get("source") != str(directory.resolve()):
        return "it was encoded from another directory"
    for split in SPLITS:
        try:
            stat = (directory / f"{split}.txt").stat()
        except OSError:
            return f"{split}.txt cannot be read"
        if manifest["sources"].get(split) != {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return f"{directory / f'{split}.txt'} changed since it was encoded"
    return None


def _open(entry: Path, directory: Path, name: str, quiet: bool = False) -> Corpus | str:
    """The corpus in ``entry`` or, when it cannot be used, why (said on stderr unless ``quiet``
    or the entry is simply missing)."""
    manifest = read_manifest(entry)
    why = manifest if isinstance(manifest, str) else _stale(manifest, directory)
    if why is None:
        assert isinstance(manifest, dict)
        try:
            return _map_corpus(entry, manifest, name)
        except (KeyError, TypeError, ValueError, RuntimeError, ReglmError, OSError) as exc:
            why = f"it is damaged ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
    if why != "missing" and not quiet:
        print(f"reglm: the encoded cache {entry} cannot be used: {why}; encoding {name} again", file=sys.stderr)
    return why


def _load_vocab(path: Path) -> Vocab:
    """The vocabulary an entry stores as JSON (``{"itos": [...], "counts": [...]}`` and the unknown
    types and tokens, absent from entries written before they were recorded): parsed in C,
    several times faster than ``vocab.txt`` for the 267,735 words of WikiText-103."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return Vocab(data["itos"], data["counts"], data.get("unk_types", 0), data.get("unk_tokens", 0))


def _map_corpus(entry: Path, manifest: dict[str, Any], name: str, vocab: Vocab | None = None) -> Corpus:
    """The corpus of a usable entry (``vocab``: its vocabulary when already in memory, checked)."""
    identity = manifest["identity"]
    if vocab is None:
        vocab = _load_vocab(entry / VOCAB)
    if vocab.fingerprint() != identity["vocab_fingerprint"] or len(vocab) != identity["vocab_size"]:
        raise ValueError(f"{VOCAB} is not the vocabulary the ids were encoded with")
    if identity["tokenizer"] == "bpe" and not isinstance(vocab, BPEVocab):
        vocab = BPEVocab.from_tokenizer_file(vocab, entry / TOKENIZER)
    ids, ends = {}, {}
    dtype = id_dtype(len(vocab))
    for split in SPLITS:
        part = identity["splits"][split]
        if part["dtype"] != dtype:
            raise ValueError(
                f"the manifest says {split}.ids holds {part['dtype']}, "
                f"but the ids of {len(vocab):,} words are written as {dtype}"
            )
        ids[split] = _map(entry / f"{split}.ids", dtype, part["tokens"], len(vocab))
        if identity["tokenizer"] == "bpe":
            ends[split] = _map(entry / f"{split}.ends", "bool", part["tokens"], 2)
    info = CacheInfo(entry, manifest_hash(identity), identity["splits"]["train"]["dtype"])
    return Corpus(name=name, vocab=vocab, **ids, word_ends=ends or None, cache=info)


def _map(path: Path, dtype: str, tokens: int, bound: int) -> torch.Tensor:
    """``tokens`` values of ``path`` mapped copy-on-write, each checked to lie in ``0 .. bound - 1``
    (one pass, as fast as reading the pages; uint8 / uint16 ids are widened to int32 on the way)."""
    itemsize = 1 if dtype in ("bool", "uint8") else np.dtype(dtype).itemsize
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        raise ValueError(f"the manifest gives {path.name} {tokens!r} values, not a count")
    size = path.stat().st_size
    if size != tokens * itemsize:
        raise ValueError(
            f"{path.name} holds {size:,} bytes, the manifest says {tokens:,} values of {itemsize} bytes (truncated?)"
        )
    if tokens == 0:
        return torch.zeros(0, dtype=torch.bool if dtype == "bool" else torch.int32)
    stored = torch.uint8 if dtype == "bool" else _TORCH[dtype]
    mapped = torch.from_file(str(path), shared=False, size=tokens, dtype=stored)
    values = mapped if dtype in ("bool", "int32") else mapped.to(torch.int32)
    low, high = (int(v) for v in torch.aminmax(values))
    if low < 0 or high >= bound:
        bad = low if low < 0 else high
        raise ValueError(f"{path.name} holds the value {bad}, outside 0 .. {bound - 1} (a damaged byte?)")
    return values.view(torch.bool) if dtype == "bool" else values


# --------------------------------------------------------------------------------------- writing


@contextmanager
def _locked(entry: Path, name: str) -> Iterator[None]:
    """Hold the exclusive build lock of ``entry`` (waiting, with a message, while another has it)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(entry.with_name(entry.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _cache_error(exc, name) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"reglm: another process is encoding {name} into {entry}; waiting for it", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_leftovers(entry: Path) -> None:
    """Delete the staging directories of ``entry`` that a killed build left (``kill -9``, a lost
    machine). Called under the entry's build lock: every builder of the entry holds it while its
    staging directory exists, so one found now belongs to a process that is gone."""
    for path in entry.parent.glob(f".{glob.escape(entry.name)}.*.tmp"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _cache_error(exc: OSError, name: str) -> ReglmError:
    where = exc.filename or cache_root()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space there, or point REGLM_DATA_DIR at a disk with room"
    else:
        fix = "make it writable, or point REGLM_DATA_DIR at a writable directory"
    return ReglmError(
        f"cannot write the encoded cache of {name} ({where}: {exc.strerror or exc}); {fix}; nothing half-written "
        "was kept"
    )


def _build(
    entry: Path,
    spec: dict[str, Any],
    directory: Path,
    name: str,
    tokenizer: str,
    min_freq: int,
    max_vocab: int | None,
    bpe_vocab_size: int,
    vocab: Vocab | None,
    progress: bool,
) -> tuple[Vocab, dict[str, Any]]:
    """Encode the corpus into a temporary sibling of ``entry`` and rename it into place; returns
    its vocabulary and manifest."""
    staging = temp_sibling(entry)
    started = time.time()
    try:
        staging.mkdir()
        sources = {}
        for split in SPLITS:
            stat = (directory / f"{split}.txt").stat()
            sources[split] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if tokenizer == "bpe":
            vocab, splits = encode_subwords(staging, directory, name, vocab, bpe_vocab_size)
        else:
            vocab, splits = encode_words(staging, directory, name, vocab, min_freq, max_vocab, progress)
        stored = {"itos": vocab.itos, "counts": vocab.counts}
        stored |= {"unk_types": vocab.unk_types, "unk_tokens": vocab.unk_tokens}
        write_text(staging / VOCAB, json.dumps(stored, ensure_ascii=False))
        identity: dict[str, Any] = {
            "tokenizer": tokenizer,
            "vocab_fingerprint": vocab.fingerprint(),
            "vocab_size": len(vocab),
            "splits": splits,
        }
        if isinstance(vocab, BPEVocab):
            vocab.save_tokenizer(staging / TOKENIZER)
            identity["merges"] = vocab.tokenizer_fingerprint()
        from reglm import __version__

        manifest = {
            "format": FORMAT,
            "name": name,
            "settings": spec,
            "sources": sources,
            "identity": identity,
            "created": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(started)),
            "seconds": round(time.time() - started, 3),
            "reglm": __version__,
        }
        write_json(staging / MANIFEST, manifest)
        _fsync_dir(staging)
        if entry.exists():
            old = temp_sibling(entry)
            os.rename(entry, old)
            os.rename(staging, entry)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, entry)
        _fsync_dir(entry.parent)
        return vocab, manifest
    except OSError as exc:
        if exc.filename is not None and cache_root() not in Path(exc.filename).parents:
            raise
        raise _cache_error(exc, name) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------- checks, reports


def verify(entry: Path) -> list[str]:
    """Every file of ``entry`` whose sha256 differs from its manifest (empty: all intact)."""
    manifest = read_manifest(entry)
    if isinstance(manifest, str):
        return [f"{MANIFEST}: {manifest}"]
    bad = []
    for split, part in manifest["identity"]["splits"].items():
        for suffix, key in ((".ids", "sha256"), (".ends", "ends_sha256")):
            if key in part and _sha256(entry / f"{split}{suffix}") != part[key]:
                bad.append(f"{split}{suffix}")
    return bad


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def discard(entry: Path, name: str) -> None:
    """Remove ``entry``'s manifest (under its build lock), so the next read builds it again."""
    with _locked(entry, name):
        (entry / MANIFEST).unlink(missing_ok=True)


def describe(info: CacheInfo) -> dict[str, Any]:
    """Where a cached corpus lives, its size on disk, id dtype, manifest hash and age."""
    manifest = read_manifest(info.path)
    created = manifest.get("created") if isinstance(manifest, dict) else None
    files = [p for p in info.path.iterdir() if p.is_file()]
    age = time.time() - (info.path / MANIFEST).stat().st_mtime
    return {
        "path": str(info.path),
        "bytes": sum(p.stat().st_size for p in files),
        "dtype": info.dtype,
        "manifest_hash": info.manifest_hash,
        "created": created,
        "age_s": round(age, 1),
    }
