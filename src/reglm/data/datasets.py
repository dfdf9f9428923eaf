"""Built-in corpora (PTB, WikiText-2, WikiText-103, the billion-word benchmark): download, verify, name resolution.

A built-in corpus lives in ``<cache>/<name>/{train,valid,test}.txt`` (``<cache>``: the
``data_dir`` argument, else ``$REGLM_DATA_DIR``, else ``~/.cache/reglm``). When those three files
are already there (a previous download, or offline copies put there by hand) they are used as
they are; nothing is written there. Otherwise the canonical archive is downloaded to a temp file
in the cache, the members of the three splits are extracted (a split of several members is their
concatenation, in order) into a temp directory, verified, and only then moved into place; on any
failure nothing is left behind. Every corpus is then read through the encoded-corpus cache
(:mod:`reglm.data.cache`), custom directories included.

Verification:

* PTB and WikiText-2: the sha256 of every extracted split. Cached copies are hashed again
  the first time a process uses them, so a damaged cache is caught; reading
  needs no write access.
* WikiText-103: no per-file sha256 is known here, so a download is verified by the published
  counts under the corpus rule (:mod:`reglm.data.corpus`): 103,227,021 / 217,646 / 245,569
  tokens and a training vocabulary of 267,735 (``<eos>`` included). Cached copies are not
  recounted.
* The billion-word benchmark (``lm1b``; Chelba et al. 2013, the release
  ``1-billion-word-language-modeling-benchmark-r13output.tar.gz``): the archive's size and
  sha256 as the Hugging Face ``lm1b`` dataset records them (``urls_checksums/checksums.txt``:
  1,792,209,805 bytes, ``01ba6038...a34e``), then the published counts of two splits: train
  (the 99 shards ``training-monolingual.tokenized.shuffled/news.en-000{01..99}-of-00100``)
  30,301,028 sentences of 768,648,884 words (the training-token count of the bilm-tf ELMo
  recipe; the sentence count is also the Hugging Face card's), so 798,949,912 tokens with one
  ``<eos>`` per sentence; test (held-out shard 0, ``news.en.heldout-00000-of-00050``, by
  convention the benchmark's test set) 6,075 sentences, 153,583 words, 159,658 tokens
  (tensor2tensor's ``lm_example.py``). Valid is held-out shard 1
  (``news.en.heldout-00001-of-00050``), for which no count is published: the archive's checksum
  covers it. The Hugging Face card's test split (306,688 sentences) is all 50 held-out shards,
  not shard 0. The vocabulary is the words seen at least 3 times in training
  (:attr:`Source.min_freq`), as the benchmark's own 793,471 (which counts ``<S>``, ``</S>`` and
  ``<UNK>``); each line is a sentence (:attr:`Source.sentences`), already shuffled by the release.

Published sizes (same rule): PTB 929,589 / 73,760 / 82,430 tokens, vocabulary 10,000;
WikiText-2 2,088,628 / 217,646 / 245,569, vocabulary 33,278.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from reglm.data.bpe import BPEVocab
from reglm.data.cache import load_cached
from reglm.data.corpus import SPLITS, Corpus, cache_dir
from reglm.data.encoding import count_file
from reglm.data.synthetic import synthetic_corpus
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError
from reglm.io import temp_sibling

if TYPE_CHECKING:
    from reglm.config import RunConfig


@dataclass(frozen=True)
class Source:
    """Where a built-in corpus comes from and how to verify it.

    ``members`` maps each split to its paths inside the archive (concatenated in that order);
    ``sha256`` maps each split to the digest of the extracted file (``None``: verify by
    ``tokens`` / ``vocab_size`` instead; a count of ``None`` is not published and not checked).
    ``archive_sha256`` / ``archive_bytes`` check the download itself. ``vocab_size`` is the
    published vocabulary (checked as the training types when ``min_freq`` is 1); ``min_freq`` is
    the benchmark's own cut (the vocabulary ``data.min_freq`` can only cut further); ``sentences``:
    every line is an independent sentence (batch with ``train.batching=sentences``).
    """

    url: str
    members: dict[str, tuple[str, ...]]
    tokens: tuple[int | None, int | None, int | None]
    vocab_size: int
    sha256: dict[str, str] | None = None
    archive_sha256: str | None = None
    archive_bytes: int | None = None
    min_freq: int = 1
    sentences: bool = False


_LM1B = "1-billion-word-language-modeling-benchmark-r13output"

SOURCES: dict[str, Source] = {
    "ptb": Source(
        url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        members={s: (f"simple-examples/data/ptb.{s}.txt",) for s in SPLITS},
        tokens=(929_589, 73_760, 82_430),
        vocab_size=10_000,
        sha256={
            "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
    ),
    "wikitext-2": Source(
        url="https://wikitext.smerity.com/wikitext-2-v1.zip",
        members={s: (f"wikitext-2/wiki.{s}.tokens",) for s in SPLITS},
        tokens=(2_088_628, 217_646, 245_569),
        vocab_size=33_278,
        sha256={
            "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
    ),
    "wikitext-103": Source(
        url="https://wikitext.smerity.com/wikitext-103-v1.zip",
        members={s: (f"wikitext-103/wiki.{s}.tokens",) for s in SPLITS},
        tokens=(103_227_021, 217_646, 245_569),
        vocab_size=267_735,
    ),
    "lm1b": Source(
        url=f"http://www.statmt.org/lm-benchmark/{_LM1B}.tar.gz",
        members={
            "train": tuple(
                f"{_LM1B}/training-monolingual.tokenized.shuffled/news.en-{i:05d}-of-00100" for i in range(1, 100)
            ),
            "valid": (f"{_LM1B}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00001-of-00050",),
            "test": (f"{_LM1B}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050",),
        },
        tokens=(768_648_884 + 30_301_028, None, 153_583 + 6_075),
        vocab_size=793_471,
        archive_sha256="01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e",
        archive_bytes=1_792_209_805,
        min_freq=3,
        sentences=True,
    ),
}
"""The published numbers and their sources are in the module docstring."""

_verified: set[Path] = set()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(name: str, directory: Path, where: str, counts: bool = True) -> None:
    """Check the three splits in ``directory`` against ``SOURCES[name]``; ``where`` says what to
    do on failure. ``counts``: also the published counts (a pass over the text; at download)."""
    source = SOURCES[name]
    if source.sha256 is not None:
        for split in SPLITS:
            path = directory / f"{split}.txt"
            if _sha256(path) != source.sha256[split]:
                raise ReglmError(f"{name} {split}.txt does not match the published file (sha256 differs); {where}")
        return
    if not counts:
        return
    progress = sys.stderr.isatty()
    for split, expected in zip(SPLITS, source.tokens):
        with_types = split == "train" and source.min_freq == 1
        if expected is None and not with_types:
            continue
        n, types = count_file(
            directory / f"{split}.txt", types=with_types, progress=progress, desc=f"verifying {name} {split}"
        )
        if expected is not None and n != expected:
            raise ReglmError(f"{name} {split}.txt has {n:,} tokens, the published file {expected:,}; {where}")
        if types is not None and types != source.vocab_size:
            raise ReglmError(
                f"{name} train.txt has {types:,} word types, the published file {source.vocab_size:,}; {where}"
            )


def _fetch(url: str, dest: Path, name: str, manual: str) -> tuple[int, str]:
    """Stream ``url`` into the new file ``dest`` (tqdm progress bar when stderr is a terminal);
    returns its size and sha256."""
    try:
        out = open(dest, "xb")
    except OSError as exc:
        raise ReglmError(
            f"cannot write into the data cache {dest.parent} ({exc}); pass --data-dir with a writable directory"
        ) from None
    digest, size = hashlib.sha256(), 0
    with out:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"downloading {name}", disable=not sys.stderr.isatty()
                ) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        digest.update(block)
                        size += len(block)
                        bar.update(len(block))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise ReglmError(f"could not download {name} from {url} ({exc}); {manual}") from None
    return size, digest.hexdigest()


def _extract(archive: Path, source: Source, dest: Path, url: str, manual: str) -> None:
    """Write ``dest/{split}.txt`` as the concatenation of the split's archive members (zip or tar;
    a leading ``./`` is ignored). A tar is read once, front to back, each wanted member copied to
    a part file as it passes (a compressed tar cannot seek back); the parts are then joined."""
    index = {member: (split, i) for split in SPLITS for i, member in enumerate(source.members[split])}
    parts: dict[tuple[str, int], Path] = {}
    try:
        with ExitStack() as stack:
            if zipfile.is_zipfile(archive):
                zf = stack.enter_context(zipfile.ZipFile(archive))
                entries = ((n.removeprefix("./"), n) for n in zf.namelist())
                open_member = zf.open
            else:
                tf = stack.enter_context(tarfile.open(archive))
                entries = ((m.name.removeprefix("./"), m) for m in tf if m.isfile())
                open_member = tf.extractfile
            for path, member in entries:
                if path in index and index[path] not in parts:
                    part = dest / f".part-{len(parts):05d}"
                    with open_member(member) as src, open(part, "xb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    parts[index[path]] = part
        for member, key in index.items():
            if key not in parts:
                raise ReglmError(f"the archive from {url} has no {member}; {manual}")
        for split in SPLITS:
            with open(dest / f"{split}.txt", "xb") as out:
                for i in range(len(source.members[split])):
                    with open(parts[split, i], "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                    parts[split, i].unlink()
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ReglmError(f"the archive from {url} is damaged ({exc}); {manual}") from None


def download(name: str, data_dir: str | Path | None = None) -> Path:
    """The directory ``<cache>/<name>`` holding verified ``train.txt`` / ``valid.txt`` / ``test.txt``.

    Uses the files already there when all three exist (verified by sha256 once per process
    where a digest is known); otherwise downloads, checks the archive where its size and sha256
    are known, extracts and verifies into temp locations and moves the files into place only
    when everything checks out.
    """
    if name not in SOURCES:
        raise ReglmError(f"unknown built-in corpus {name!r}; choose one of {', '.join(SOURCES)}")
    source = SOURCES[name]
    target = cache_dir(data_dir) / name
    if all((target / f"{split}.txt").is_file() for split in SPLITS):
        if source.sha256 is not None and target.resolve() not in _verified:
            _verify(
                name,
                target,
                f"delete {target} to download it again, or pass the directory itself as a custom corpus",
                counts=False,
            )
            _verified.add(target.resolve())
        return target
    members = [m for split in SPLITS for m in source.members[split]]
    shown = ", ".join(members) if len(members) <= 3 else f"{', '.join(members[:2])}, ... ({len(members)} files)"
    manual = (
        f"download {source.url} by hand, put {shown} into <dir>/{name}/ as train.txt, valid.txt, test.txt "
        f"(a split of several files is their concatenation in order) and pass --data-dir <dir>"
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReglmError(
            f"cannot write into the data cache {target.parent} ({exc}); pass --data-dir with a writable directory"
        ) from None
    archive = temp_sibling(target.parent / f"{name}.archive")
    staging = temp_sibling(target)
    try:
        size, digest = _fetch(source.url, archive, name, manual)
        if (source.archive_bytes is not None and size != source.archive_bytes) or (
            source.archive_sha256 is not None and digest != source.archive_sha256
        ):
            raise ReglmError(
                f"the download from {source.url} is damaged or has changed ({size:,} bytes, sha256 {digest}; "
                f"published: {source.archive_bytes} bytes, sha256 {source.archive_sha256}); {manual}"
            )
        staging.mkdir()
        _extract(archive, source, staging, source.url, manual)
        archive.unlink()
        _verify(name, staging, f"the download from {source.url} is damaged or has changed; {manual}")
        target.mkdir(exist_ok=True)
        for split in SPLITS:
            os.replace(staging / f"{split}.txt", target / f"{split}.txt")
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    _verified.add(target.resolve())
    return target


def resolve(
    name: str,
    data_dir: str | Path | None = None,
    min_freq: int = 1,
    max_vocab: int | None = None,
    synthetic_seed: int = 0,
    synthetic_sentences: int = 80_000,
    synthetic_rule: str = "stream",
    tokenizer: str = "word",
    bpe_vocab_size: int = 32_000,
    vocab: Vocab | None = None,
) -> Corpus:
    """The corpus a ``data.name`` option designates.

    A built-in name (``ptb``, ``wikitext-2``, ``wikitext-103``, ``lm1b``) is downloaded when needed;
    ``synthetic`` is the synthetic trigram corpus of ``synthetic_seed`` with ``synthetic_sentences``
    training sentences and one eighth of that for valid and for test (the paper's 80k / 10k / 10k by
    default), under the reading ``synthetic_rule``; an existing directory is read as a custom corpus
    (a built-in name wins over a directory of that name: write ``./ptb``). Built-in and custom
    corpora are read through the encoded-corpus cache (:func:`reglm.data.cache.load_cached`: encoded
    once, memory-mapped afterwards, the same ids). ``min_freq`` / ``max_vocab`` shape the vocabulary
    of built-in and custom corpora (the defaults keep every training word; a built-in corpus's
    vocabulary is the benchmark's, ``min_freq`` can only cut it further: at least 3 on ``lm1b``);
    the synthetic vocabulary is closed.

    ``tokenizer="bpe"`` gives a sub-word corpus of a built-in or custom corpus
    (:mod:`reglm.data.bpe`): units of ``bpe_vocab_size`` learnt on ``train.txt``, every split
    segmented, with ``word_ends`` for word-level perplexity. ``vocab`` fixes the vocabulary instead
    of building one (a model's: a :class:`~reglm.data.bpe.BPEVocab` also fixes the segmentation,
    so nothing is learnt); the synthetic corpus always has its own closed vocabulary.
    """
    bpe = tokenizer == "bpe" or isinstance(vocab, BPEVocab)
    options = dict(max_vocab=max_vocab, tokenizer=tokenizer, bpe_vocab_size=bpe_vocab_size, vocab=vocab)
    if name in SOURCES:
        directory = download(name, data_dir)
        return load_cached(
            directory, name=name, min_freq=min_freq if bpe else max(min_freq, SOURCES[name].min_freq), **options
        )
    if name == "synthetic":
        if bpe:
            raise ReglmError(
                "the synthetic corpus is word-level (its true probabilities are per word); use tokenizer=word, or "
                "bpe with a natural-text corpus"
            )
        n_eval = synthetic_sentences // 8
        sizes = (synthetic_sentences, n_eval, n_eval)
        return synthetic_corpus(seed=synthetic_seed, data_dir=data_dir, sizes=sizes, rule=synthetic_rule)
    if Path(name).expanduser().is_dir():
        return load_cached(Path(name).expanduser(), min_freq=min_freq, **options)
    raise ReglmError(
        f"unknown corpus {name!r} (not a built-in name, and directory {name} does not exist); "
        f"choose one of {', '.join([*SOURCES, 'synthetic'])}, or give a directory holding train.txt, valid.txt and "
        "test.txt"
    )


def load_corpus(config: RunConfig, vocab: Vocab | None = None) -> Corpus:
    """The run's corpus; ``vocab`` (a trained model's) fixes the vocabulary, and for sub-word
    models the segmentation, instead of building them from the training split."""
    d = config.data
    corpus = resolve(
        d.name,
        data_dir=d.data_dir,
        min_freq=d.min_freq,
        max_vocab=d.max_vocab,
        synthetic_seed=d.synthetic_seed,
        synthetic_sentences=d.synthetic_sentences,
        synthetic_rule=d.synthetic_rule,
        tokenizer=d.tokenizer,
        bpe_vocab_size=d.bpe_vocab_size,
        vocab=vocab,
    )
    return training_part(corpus, d.train_part, d.train_parts)


def training_part(corpus: Corpus, part: int, parts: int) -> Corpus:
    """``corpus`` training on part ``part`` (1-based) of ``parts`` of its training stream
    (``data.train_part`` / ``data.train_parts``; Inan et al. Table 2: each half of WikiText-2),
    the vocabulary and the other splits unchanged. The stream is cut into ``parts`` runs of
    whole lines of about equal token counts: part k ends after the first ``<eos>`` at or
    beyond token ``k * N / parts``."""
    if parts == 1:
        return corpus
    ids = corpus.train
    line_ends = (ids == corpus.vocab.eos_id).nonzero().flatten() + 1
    cuts = [
        0,
        *(
            int(line_ends[min(int(torch.searchsorted(line_ends, k * ids.numel() // parts)), line_ends.numel() - 1)])
            for k in range(1, parts)
        ),
        ids.numel(),
    ]
    start, end = cuts[part - 1], cuts[part]
    if end <= start + 1:
        raise ReglmError(
            f"data.train_part={part} of data.train_parts={parts} leaves no training text ({ids.numel()} tokens in "
            f"{line_ends.numel()} lines); lower data.train_parts"
        )
    word_ends = (
        None if corpus.word_ends is None else {**corpus.word_ends, "train": corpus.word_ends["train"][start:end]}
    )
    return dataclasses.replace(corpus, train=ids[start:end], word_ends=word_ends)
