"""Built-in corpora (PTB, WikiText-2, WikiText-103): download, verify, cache, and name resolution.

A built-in corpus lives in ``<cache>/<name>/{train,valid,test}.txt`` (``<cache>``: the
``data_dir`` argument, else ``$REGLM_DATA_DIR``, else ``~/.cache/reglm``). When those three files
are already there (a previous download, or offline copies put there by hand) they are used as
they are; nothing is written. Otherwise the canonical archive is downloaded to a temp file in
the cache, the three members are extracted into a temp directory, verified, and only then moved
into place; on any failure nothing is left behind.

Verification:

* PTB and WikiText-2: the sha256 of every extracted split. Cached copies are hashed again
  the first time a process uses them (about 0.1 s), so a damaged cache is caught; reading
  needs no write access.
* WikiText-103: no per-file sha256 is known here, so a download is verified by the published
  counts under the corpus rule (:mod:`reglm.data.corpus`): 103,227,021 / 217,646 / 245,569
  tokens and a training vocabulary of 267,735 (``<eos>`` included). Counting takes about a
  minute, so cached copies are not recounted.

Published sizes (same rule): PTB 929,589 / 73,760 / 82,430 tokens, vocabulary 10,000;
WikiText-2 2,088,628 / 217,646 / 245,569, vocabulary 33,278.
"""

from __future__ import annotations

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

from tqdm import tqdm

from reglm.data.bpe import BPEVocab
from reglm.data.corpus import SPLITS, Corpus, cache_dir, iter_lines, load_directory
from reglm.data.vocab import Vocab
from reglm.data.synthetic import synthetic_corpus
from reglm.io import temp_sibling
from reglm.errors import ReglmError


@dataclass(frozen=True)
class Source:
    """Where a built-in corpus comes from and how to verify it.

    ``members`` maps each split to its path inside the archive; ``sha256`` maps each split to
    the digest of the extracted file (``None``: verify by ``tokens`` / ``vocab_size`` instead).
    """

    url: str
    members: dict[str, str]
    tokens: tuple[int, int, int]
    vocab_size: int
    sha256: dict[str, str] | None = None


SOURCES: dict[str, Source] = {
    "ptb": Source(
        url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        members={s: f"simple-examples/data/ptb.{s}.txt" for s in SPLITS},
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
        members={s: f"wikitext-2/wiki.{s}.tokens" for s in SPLITS},
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
        members={s: f"wikitext-103/wiki.{s}.tokens" for s in SPLITS},
        tokens=(103_227_021, 217_646, 245_569),
        vocab_size=267_735,
    ),
}

_verified: set[Path] = set()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(name: str, directory: Path, where: str) -> None:
    """Check the three splits in ``directory`` against ``SOURCES[name]``; ``where`` says what to do on failure."""
    source = SOURCES[name]
    if source.sha256 is not None:
        for split in SPLITS:
            path = directory / f"{split}.txt"
            if _sha256(path) != source.sha256[split]:
                raise ReglmError(f"{name} {split}.txt does not match the published file (sha256 differs); {where}")
        return
    vocab: set[str] = set()
    for split, expected in zip(SPLITS, source.tokens):
        n = 0
        for _, words in iter_lines(directory / f"{split}.txt"):
            n += len(words) + 1
            if split == "train":
                vocab.update(words)
        if n != expected:
            raise ReglmError(f"{name} {split}.txt has {n:,} tokens, the published file {expected:,}; {where}")
    if len(vocab | {"<eos>"}) != source.vocab_size:
        raise ReglmError(f"{name} train.txt has {len(vocab | {'<eos>'}):,} word types, the published file {source.vocab_size:,}; {where}")


def _fetch(url: str, dest: Path, name: str, manual: str) -> None:
    """Stream ``url`` into the new file ``dest`` (tqdm progress bar when stderr is a terminal)."""
    try:
        out = open(dest, "xb")
    except OSError as exc:
        raise ReglmError(f"cannot write into the data cache {dest.parent} ({exc}); pass --data-dir with a writable directory") from None
    with out:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                size = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=size, unit="B", unit_scale=True, desc=f"downloading {name}", disable=not sys.stderr.isatty()) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        out.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            raise ReglmError(f"could not download {name} from {url} ({exc}); {manual}") from None


def _extract(archive: Path, source: Source, dest: Path, url: str, manual: str) -> None:
    """Copy the archive members of the three splits (zip or tar; a leading ``./`` is ignored) to ``dest/{split}.txt``."""
    try:
        with ExitStack() as stack:
            if zipfile.is_zipfile(archive):
                zf = stack.enter_context(zipfile.ZipFile(archive))
                members = {n.removeprefix("./"): n for n in zf.namelist()}
                open_member = zf.open
            else:
                tf = stack.enter_context(tarfile.open(archive))
                members = {m.name.removeprefix("./"): m for m in tf.getmembers() if m.isfile()}
                open_member = tf.extractfile
            for split in SPLITS:
                wanted = source.members[split]
                if wanted not in members:
                    raise ReglmError(f"the archive from {url} has no {wanted}; {manual}")
                with open_member(members[wanted]) as member, open(dest / f"{split}.txt", "xb") as out:
                    shutil.copyfileobj(member, out, 1 << 20)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise ReglmError(f"the archive from {url} is damaged ({exc}); {manual}") from None


def download(name: str, data_dir: str | Path | None = None) -> Path:
    """The directory ``<cache>/<name>`` holding verified ``train.txt`` / ``valid.txt`` / ``test.txt``.

    Uses the files already there when all three exist (verified by sha256 once per process
    where a digest is known); otherwise downloads, extracts and verifies into temp locations
    and moves the files into place only when everything checks out.
    """
    if name not in SOURCES:
        raise ReglmError(f"unknown built-in corpus {name!r}; choose one of {', '.join(SOURCES)}")
    source = SOURCES[name]
    target = cache_dir(data_dir) / name
    if all((target / f"{split}.txt").is_file() for split in SPLITS):
        if source.sha256 is not None and target.resolve() not in _verified:
            _verify(name, target, f"delete {target} to download it again, or pass the directory itself as a custom corpus")
            _verified.add(target.resolve())
        return target
    manual = (
        f"download {source.url} by hand, put its {', '.join(source.members.values())} into "
        f"<dir>/{name}/ as train.txt, valid.txt, test.txt and pass --data-dir <dir>"
    )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReglmError(f"cannot write into the data cache {target.parent} ({exc}); pass --data-dir with a writable directory") from None
    archive = temp_sibling(target.parent / f"{name}.archive")
    staging = temp_sibling(target)
    try:
        _fetch(source.url, archive, name, manual)
        staging.mkdir()
        _extract(archive, source, staging, source.url, manual)
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
    tokenizer: str = "word",
    bpe_vocab_size: int = 32_000,
    vocab: Vocab | None = None,
) -> Corpus:
    """The corpus a ``data.name`` option designates.

    A built-in name (``ptb``, ``wikitext-2``, ``wikitext-103``) is downloaded when needed and
    read; ``synthetic`` is the synthetic trigram corpus of ``synthetic_seed`` with
    ``synthetic_sentences`` training sentences and one eighth of that for valid and for test
    (the paper's 80k / 10k / 10k by default); an existing
    directory is read as a custom corpus (a built-in name wins over a directory of that name:
    write ``./ptb``). ``min_freq`` / ``max_vocab`` shape the vocabulary of built-in and custom
    corpora (the defaults keep every training word); the synthetic vocabulary is closed.

    ``tokenizer="bpe"`` gives a sub-word corpus of a built-in or custom corpus
    (:mod:`reglm.data.bpe`): units of ``bpe_vocab_size`` learnt on ``train.txt``, every split
    segmented, with ``word_ends`` for word-level perplexity. ``vocab`` fixes the vocabulary instead
    of building one (a model's: a :class:`~reglm.data.bpe.BPEVocab` also fixes the segmentation,
    so nothing is learnt); the synthetic corpus always has its own closed vocabulary.
    """
    bpe = tokenizer == "bpe" or isinstance(vocab, BPEVocab)
    sub = dict(tokenizer=tokenizer, bpe_vocab_size=bpe_vocab_size, vocab=vocab) if bpe or vocab is not None else {}
    if name in SOURCES:
        return load_directory(download(name, data_dir), name=name, min_freq=min_freq, max_vocab=max_vocab, **sub)
    if name == "synthetic":
        if bpe:
            raise ReglmError("the synthetic corpus is word-level (its true probabilities are per word); use tokenizer=word, or bpe with a natural-text corpus")
        n_eval = synthetic_sentences // 8
        return synthetic_corpus(seed=synthetic_seed, data_dir=data_dir, sizes=(synthetic_sentences, n_eval, n_eval))
    if Path(name).expanduser().is_dir():
        return load_directory(Path(name).expanduser(), min_freq=min_freq, max_vocab=max_vocab, **sub)
    raise ReglmError(
        f"unknown corpus {name!r} (not a built-in name, and directory {name} does not exist); "
        f"choose one of {', '.join([*SOURCES, 'synthetic'])}, or give a directory holding train.txt, valid.txt and test.txt"
    )
