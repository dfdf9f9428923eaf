"""Plain-text corpora: token streams under the papers' rule, and the train/valid/test triple.

The rule (AWD-LSTM, Merity et al. 2017, and the pytorch ``word_language_model`` it builds on;
the published PTB / WikiText token counts follow it): every line of a file is split on
whitespace and one ``<eos>`` is appended to it, blank lines included, so a blank line is the
single token ``<eos>``. Lines end at ``\\n``; a ``\\r`` before it is whitespace, so CRLF files
read the same. A UTF-8 byte-order mark at the start of a file is ignored.

A corpus directory holds ``train.txt``, ``valid.txt`` and ``test.txt``. The vocabulary is
built from ``train.txt`` only (:meth:`reglm.data.vocab.Vocab.build`); a valid/test word outside
it becomes ``<unk>`` when the vocabulary has ``<unk>`` and is an error otherwise.

Reading is vectorized (:mod:`reglm.data.encoding`: the file in 8 MB pieces, the word types in a
numpy hash table), and the ids are those of the line-by-line rule (:func:`read_tokens` is that
rule in plain Python, kept as the reference). :mod:`reglm.data.cache` writes these ids to files
once and maps them afterwards.

Sub-word corpora (``tokenizer="bpe"``, :mod:`reglm.data.bpe`): the same words, each segmented
into BPE units learnt on ``train.txt``; every split then also has a ``word_ends: (N,) bool`` mask
(``True`` on the unit that closes a word, ``<eos>`` included), whose sum is the split's token
count under the word rule, so that perplexities stay word-level.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reglm.data.bpe import BPEVocab
from reglm.data.encoding import WordTypes, encode_chunks, type_stream
from reglm.data.vocab import EOS, Vocab
from reglm.errors import ReglmError

SPLITS = ("train", "valid", "test")
TOKENIZERS = ("word", "bpe")


@dataclass(frozen=True)
class CacheInfo:
    """Where a corpus read from the encoded-corpus cache (:mod:`reglm.data.cache`) lives: the
    entry's directory, the hash of its manifest's content (the vocabulary and the sha256 of
    every id file; what a run directory records) and the dtype of its id files."""

    path: Path
    manifest_hash: str
    dtype: str


@dataclass
class Corpus:
    """A vocabulary and three 1-D integer id streams (``<eos>`` after every line): ``int64``
    when read in memory (:func:`load_directory`), ``int32`` memory-mapped from the encoded-corpus
    cache (:mod:`reglm.data.cache`; then ``cache`` says which entry). Both hold the same ids;
    the window planner (:mod:`reglm.data.windows`) hands the model ``int64`` windows of either.

    ``truth`` is set for the synthetic corpus only: ``{"valid": (N_valid,), "test": (N_test,)}``
    float64 tensors aligned with ``valid`` / ``test``, the true natural-log probability of each
    token given its past (0.0 at ``<eos>``); ``None`` for natural text.

    ``word_ends`` is set for sub-word corpora only: ``{split: (N_split,) bool}`` aligned with each
    id stream, ``True`` on the unit that closes a word (pass it to the window planner /
    :func:`reglm.evaluate.perplexity.evaluate` for word-level perplexity); ``None`` for word
    corpora, where every token is a word. The vocabulary of a sub-word corpus is a
    :class:`~reglm.data.bpe.BPEVocab`, which carries the tokenizer (:attr:`tokenizer`).
    """

    name: str
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    truth: dict[str, torch.Tensor] | None = None
    word_ends: dict[str, torch.Tensor] | None = None
    cache: CacheInfo | None = None

    def split(self, name: str) -> torch.Tensor:
        """The id stream of ``train``, ``valid`` or ``test``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def split_word_ends(self, name: str) -> torch.Tensor | None:
        """The ``(N,)`` bool word-end mask of a split (sub-word corpora), ``None`` for word corpora."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return None if self.word_ends is None else self.word_ends[name]

    @property
    def tokenizer(self) -> BPEVocab | None:
        """The sub-word vocabulary with its tokenizer (``.hf_tokenizer``) of a BPE corpus; ``None`` for words."""
        return self.vocab if isinstance(self.vocab, BPEVocab) else None


def cache_dir(data_dir: str | Path | None = None) -> Path:
    """Where downloaded and generated corpora live: ``data_dir``, else ``$REGLM_DATA_DIR``, else ``~/.cache/reglm``."""
    if data_dir is None:
        data_dir = os.environ.get("REGLM_DATA_DIR") or Path.home() / ".cache" / "reglm"
    return Path(data_dir).expanduser()


def iter_lines(path: str | Path) -> Iterator[tuple[int, list[str]]]:
    """Stream ``(1-based line number, whitespace tokens)`` of a UTF-8 file, line by line."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ReglmError(f"{path} does not exist; check the path") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ReglmError(f"{path} is not valid UTF-8 at line {lineno}; re-encode the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            yield lineno, line.split()


def read_tokens(path: str | Path) -> list[str]:
    """All tokens of a file under the rule: each line's words followed by ``<eos>``."""
    out: list[str] = []
    for _, words in iter_lines(Path(path)):
        out.extend(words)
        out.append(EOS)
    return out


def _read_train(path: Path, min_freq: int, max_vocab: int | None) -> tuple[Vocab, torch.Tensor]:
    """Count and encode the training file in one pass.

    Words get provisional ids as they are first met; once the counts are known the vocabulary is
    built (:meth:`Vocab.from_counts`) and the provisional ids are remapped through its table.
    """
    types, ids = type_stream(path)
    vocab, table = Vocab.from_counts(types, np.bincount(ids, minlength=len(types)), min_freq, max_vocab)
    return vocab, torch.from_numpy(table[ids])


def encode_file(path: str | Path, vocab: Vocab) -> torch.Tensor:
    """The ``(N,)`` id stream of a file under a fixed vocabulary.

    A word outside the vocabulary becomes ``<unk>``; without ``<unk>`` it raises
    :class:`ReglmError` naming the word, the file and the line.
    """
    return torch.from_numpy(
        np.concatenate(list(encode_chunks(path, WordTypes.of(vocab.itos), vocab.eos_id, vocab.unk_id)))
    )


def encode_subword_file(path: str | Path, vocab: BPEVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, word_ends)``, both ``(N,)``, of a file segmented into ``vocab``'s BPE units (one
    ``<eos>`` unit after every line); ``word_ends.sum()`` is the file's token count under the word rule."""
    types, ids = type_stream(Path(path))
    return vocab.encode_stream(types, ids)


def _load_subword(path: Path, name: str, vocab: Vocab | None, bpe_vocab_size: int) -> Corpus:
    """A BPE corpus: the units learnt on ``train.txt`` (unless ``vocab`` is a :class:`BPEVocab`), every split
    segmented."""
    streams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split in SPLITS:
        types, ids = type_stream(path / f"{split}.txt")
        if vocab is None:
            vocab = BPEVocab.train(dict(zip(types, np.bincount(ids, minlength=len(types)).tolist())), bpe_vocab_size)
        streams[split] = vocab.encode_stream(types, ids)
    return Corpus(
        name=name,
        vocab=vocab,
        train=streams["train"][0],
        valid=streams["valid"][0],
        test=streams["test"][0],
        word_ends={split: ends for split, (_, ends) in streams.items()},
    )


def load_directory(
    path: str | Path,
    name: str | None = None,
    min_freq: int = 1,
    max_vocab: int | None = None,
    vocab: Vocab | None = None,
    tokenizer: str = "word",
    bpe_vocab_size: int = 32000,
) -> Corpus:
    """Read ``train.txt`` / ``valid.txt`` / ``test.txt`` of a directory into a :class:`Corpus` in memory.

    The vocabulary is built from ``train.txt`` with ``min_freq`` / ``max_vocab`` unless a fixed
    ``vocab`` is given (e.g. a closed vocabulary, or a checkpoint's), in which case every split
    is encoded with it. ``name`` defaults to the directory name.

    ``tokenizer="bpe"`` (or a :class:`~reglm.data.bpe.BPEVocab` as ``vocab``) gives a sub-word
    corpus: BPE units of ``bpe_vocab_size`` learnt on ``train.txt`` (or ``vocab``'s own units),
    with ``word_ends`` for every split; ``min_freq`` / ``max_vocab`` must keep their defaults.
    :func:`reglm.data.cache.load_cached` reads the same corpus through the encoded-corpus cache.
    """
    path = Path(path)
    tokenizer = check_directory(path, tokenizer, min_freq, max_vocab, vocab)
    if tokenizer == "bpe":
        return _load_subword(path, name or path.resolve().name, vocab, bpe_vocab_size)
    if vocab is None:
        vocab, train = _read_train(path / "train.txt", min_freq, max_vocab)
    else:
        train = encode_file(path / "train.txt", vocab)
    valid = encode_file(path / "valid.txt", vocab)
    test = encode_file(path / "test.txt", vocab)
    return Corpus(name=name or path.resolve().name, vocab=vocab, train=train, valid=valid, test=test)


def check_directory(path: Path, tokenizer: str, min_freq: int, max_vocab: int | None, vocab: Vocab | None) -> str:
    """The tokenizer a corpus directory is read with (``bpe`` when ``vocab`` is a BPE
    vocabulary), after checking the options and that the three splits exist (ReglmErrors)."""
    if tokenizer not in TOKENIZERS:
        raise ReglmError(f"unknown tokenizer {tokenizer!r}; choose {' or '.join(TOKENIZERS)}")
    if isinstance(vocab, BPEVocab):
        tokenizer = "bpe"
    if tokenizer == "bpe" and (min_freq != 1 or max_vocab is not None):
        raise ReglmError(
            "min_freq / max_vocab cut word vocabularies; a BPE corpus has none: leave them at their defaults and "
            "set bpe_vocab_size"
        )
    if tokenizer == "bpe" and vocab is not None and not isinstance(vocab, BPEVocab):
        raise ReglmError(
            "tokenizer=bpe was asked for with a word vocabulary; pass the BPE model's vocabulary (with its "
            "tokenizer.json), or tokenizer=word"
        )
    if not path.is_dir():
        raise ReglmError(
            f"corpus directory {path} does not exist; give a directory holding train.txt, valid.txt and test.txt"
        )
    for split in SPLITS:
        if not (path / f"{split}.txt").is_file():
            raise ReglmError(
                f"{path / f'{split}.txt'} is missing; a corpus directory needs train.txt, valid.txt and test.txt"
            )
    return tokenizer


def corpus_stats(corpus: Corpus) -> dict:
    """Sizes and ``<unk>`` shares.

    Returns ``{"name", "vocab_size", "has_unk", "tokens": {split: n}, "unk_rate": {split: share of
    tokens that are <unk>}}``; ``unk_rate`` counts ``<eos>`` tokens in the denominator, as the
    token counts do. A sub-word corpus adds ``"tokenizer": "bpe"`` and ``"words": {split: n}``
    (its words under the word rule; ``tokens`` and ``unk_rate`` then count units).
    """
    unk = corpus.vocab.unk_id
    tokens = {}
    unk_rate = {}
    for split in SPLITS:
        ids = corpus.split(split)
        tokens[split] = int(ids.numel())
        n_unk = int((ids == unk).sum()) if unk is not None else 0
        unk_rate[split] = n_unk / max(tokens[split], 1)
    stats = {
        "name": corpus.name,
        "vocab_size": len(corpus.vocab),
        "has_unk": unk is not None,
        "tokens": tokens,
        "unk_rate": unk_rate,
    }
    if corpus.word_ends is not None:
        stats["tokenizer"] = "bpe"
        stats["words"] = {split: int(corpus.word_ends[split].sum()) for split in SPLITS}
    return stats
