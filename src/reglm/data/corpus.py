"""Plain-text corpora: token streams under the papers' rule, and the train/valid/test triple.

The rule (AWD-LSTM, Merity et al. 2017, and the pytorch ``word_language_model`` it builds on;
the published PTB / WikiText token counts follow it): every line of a file is split on
whitespace and one ``<eos>`` is appended to it, blank lines included, so a blank line is the
single token ``<eos>``. Lines end at ``\\n``; a ``\\r`` before it is whitespace, so CRLF files
read the same. A UTF-8 byte-order mark at the start of a file is ignored.

A corpus directory holds ``train.txt``, ``valid.txt`` and ``test.txt``. The vocabulary is
built from ``train.txt`` only (:meth:`reglm.data.vocab.Vocab.build`); a valid/test word outside
it becomes ``<unk>`` when the vocabulary has ``<unk>`` and is an error otherwise.
"""

from __future__ import annotations

import os
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reglm.data.vocab import EOS, UNK, UnknownWordError, Vocab
from reglm.errors import ReglmError

SPLITS = ("train", "valid", "test")


@dataclass
class Corpus:
    """A vocabulary and three 1-D ``LongTensor`` id streams (``<eos>`` after every line).

    ``truth`` is set for the synthetic corpus only: ``{"valid": (N_valid,), "test": (N_test,)}``
    float64 tensors aligned with ``valid`` / ``test``, the true natural-log probability of each
    token given its past (0.0 at ``<eos>``); ``None`` for natural text.
    """

    name: str
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    truth: dict[str, torch.Tensor] | None = None

    def split(self, name: str) -> torch.Tensor:
        """The id stream of ``train``, ``valid`` or ``test``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


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


def _to_tensor(ids: array) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(ids, dtype=np.int64).copy())


def _check_words(path: Path, n_words: int) -> None:
    if n_words == 0:
        raise ReglmError(f"{path} holds no words (it is empty or blank); put the split's text in it")


def _read_train(path: Path, min_freq: int, max_vocab: int | None) -> tuple[Vocab, torch.Tensor]:
    """Count and encode the training file in one pass.

    Words get provisional ids in order of first appearance; once the counts are known the
    vocabulary is built and the provisional ids are remapped through a lookup table.
    """
    first_seen: dict[str, int] = {EOS: 0}
    provisional = array("q")
    n_words = 0
    for _, words in iter_lines(path):
        provisional.extend([first_seen.setdefault(w, len(first_seen)) for w in words])
        provisional.append(0)
        n_words += len(words)
    _check_words(path, n_words)
    ids = np.frombuffer(provisional, dtype=np.int64)
    counts = np.bincount(ids, minlength=len(first_seen))
    counter = Counter(dict(zip(first_seen, counts.tolist())))
    vocab = Vocab.build(counter, min_freq=min_freq, max_vocab=max_vocab)
    unk = vocab.unk_id
    table = np.array([vocab.stoi.get(w, unk) for w in first_seen], dtype=np.int64)
    return vocab, torch.from_numpy(table[ids])


def encode_file(path: str | Path, vocab: Vocab) -> torch.Tensor:
    """The ``(N,)`` id stream of a file under a fixed vocabulary.

    A word outside the vocabulary becomes ``<unk>``; without ``<unk>`` it raises
    :class:`ReglmError` naming the word, the file and the line.
    """
    path = Path(path)
    ids = array("q")
    eos = vocab.eos_id
    n_words = 0
    for lineno, words in iter_lines(path):
        try:
            ids.extend(vocab.encode(words))
        except UnknownWordError as exc:
            raise ReglmError(
                f"{path} line {lineno}: word {exc.word!r} is not in the training vocabulary, which has no {UNK}; "
                f"add {UNK} to the training data, or pass --min-freq/--max-vocab so that {UNK} exists"
            ) from None
        ids.append(eos)
        n_words += len(words)
    _check_words(path, n_words)
    return _to_tensor(ids)


def load_directory(
    path: str | Path,
    name: str | None = None,
    min_freq: int = 1,
    max_vocab: int | None = None,
    vocab: Vocab | None = None,
) -> Corpus:
    """Read ``train.txt`` / ``valid.txt`` / ``test.txt`` of a directory into a :class:`Corpus`.

    The vocabulary is built from ``train.txt`` with ``min_freq`` / ``max_vocab`` unless a fixed
    ``vocab`` is given (e.g. a closed vocabulary, or a checkpoint's), in which case every split
    is encoded with it. ``name`` defaults to the directory name.
    """
    path = Path(path)
    if not path.is_dir():
        raise ReglmError(f"corpus directory {path} does not exist; give a directory holding train.txt, valid.txt and test.txt")
    for split in SPLITS:
        if not (path / f"{split}.txt").is_file():
            raise ReglmError(f"{path / f'{split}.txt'} is missing; a corpus directory needs train.txt, valid.txt and test.txt")
    if vocab is None:
        vocab, train = _read_train(path / "train.txt", min_freq, max_vocab)
    else:
        train = encode_file(path / "train.txt", vocab)
    valid = encode_file(path / "valid.txt", vocab)
    test = encode_file(path / "test.txt", vocab)
    return Corpus(name=name or path.resolve().name, vocab=vocab, train=train, valid=valid, test=test)


def corpus_stats(corpus: Corpus) -> dict:
    """Sizes and ``<unk>`` shares.

    Returns ``{"name", "vocab_size", "has_unk", "tokens": {split: n}, "unk_rate": {split: share of
    tokens that are <unk>}}``; ``unk_rate`` counts ``<eos>`` tokens in the denominator, as the
    token counts do.
    """
    unk = corpus.vocab.unk_id
    tokens = {}
    unk_rate = {}
    for split in SPLITS:
        ids = corpus.split(split)
        tokens[split] = int(ids.numel())
        n_unk = int((ids == unk).sum()) if unk is not None else 0
        unk_rate[split] = n_unk / max(tokens[split], 1)
    return {
        "name": corpus.name,
        "vocab_size": len(corpus.vocab),
        "has_unk": unk is not None,
        "tokens": tokens,
        "unk_rate": unk_rate,
    }
