"""Word vocabulary: ids ordered by training frequency, with ``<eos>`` and an optional ``<unk>``.

Ids are assigned by descending training count, ties broken by the token string, so the same
training text always gives the same ids. Frequency order is what frequency-bucketed output
layers need (adaptive softmax / adaptive input, Baevski & Auli 2019); the reference AWD-LSTM
code numbers words by first appearance instead, which changes no perplexity. ``<eos>`` is always
present: the corpus rule appends one per line (see :mod:`reglm.data.corpus`). ``<unk>`` is present
when the training text already contains it (PTB, WikiText) or when ``min_freq`` / ``max_vocab``
dropped a word; it then carries the count of everything mapped to it.

The vocabulary also records how many distinct training words ``min_freq`` / ``max_vocab`` mapped
to ``<unk>`` and how many tokens they had (:attr:`Vocab.unk_types`, :attr:`Vocab.unk_tokens`):
scoring shares the unknown class's probability among the unknown words
(:meth:`Vocab.unknown_types`). Occurrences of ``<unk>`` already in the training text (PTB and
WikiText come mapped) are words whose types nobody recorded; each is counted as a type of its own,
the largest number the counts allow.

On disk a vocabulary is ``vocab.txt``: UTF-8, one ``token<TAB>count`` line per id, in id order;
the ``<unk>`` line of a vocabulary that dropped words carries two more fields,
``<unk><TAB>count<TAB>unknown types<TAB>unknown tokens``. A file without them (as written before
they were recorded) loads with both numbers 0: every ``<unk>`` of the training text then counts
as a type of its own.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np

from reglm.errors import ReglmError
from reglm.io import write_text

EOS = "<eos>"
UNK = "<unk>"
_COUNT = re.compile(r"[0-9]{1,18}")
"""A count in ``vocab.txt``: plain ASCII digits, short enough for an int64 (``str.isdigit`` takes
any script's digits, and ``int`` refuses a number of thousands of digits)."""


class UnknownWordError(KeyError):
    """A word outside a vocabulary that has no ``<unk>``; ``word`` and ``position`` say which."""

    def __init__(self, word: str, position: int) -> None:
        super().__init__(word)
        self.word = word
        self.position = position


class Vocab:
    """A bijection token <-> id plus the training count of every token.

    Attributes:
        itos: token of each id, ``len(itos) == len(self)``.
        stoi: id of each token.
        counts: training count of each id (0 for a special token never seen in training).
    """

    def __init__(self, itos: list[str], counts: list[int], unk_types: int = 0, unk_tokens: int = 0) -> None:
        if len(itos) != len(counts):
            raise ValueError(f"{len(itos)} tokens but {len(counts)} counts")
        if EOS not in itos:
            raise ValueError(f"a vocabulary needs {EOS}")
        self.itos = list(itos)
        self.counts = [int(c) for c in counts]
        self.stoi = {tok: i for i, tok in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate tokens in the vocabulary")
        unk_count = self.counts[self.stoi[UNK]] if UNK in self.stoi else 0
        if not (0 <= unk_types <= unk_tokens <= unk_count):
            raise ValueError(
                f"unk_types={unk_types}, unk_tokens={unk_tokens}: need 0 <= types <= tokens <= {unk_count}"
                f" (the {UNK} count)"
            )
        self.unk_types = int(unk_types)
        """distinct training words mapped to ``<unk>`` by ``min_freq`` / ``max_vocab``"""
        self.unk_tokens = int(unk_tokens)
        """their occurrences in the training text (the rest of ``<unk>``'s count was ``<unk>`` already)"""

    @classmethod
    def build(cls, counter: Counter, min_freq: int = 1, max_vocab: int | None = None) -> "Vocab":
        """The vocabulary of a training text's token counts.

        Words seen fewer than ``min_freq`` times, and the least frequent words beyond
        ``max_vocab`` entries (``<eos>`` and ``<unk>`` included in that number), are dropped;
        ``<unk>`` is then added, with its own count plus the counts of every dropped word, when
        anything was dropped or ``<unk>`` occurs in ``counter``. ``<eos>`` is always kept.
        ``min_freq=0`` keeps every key of ``counter``, zero counts included (a closed
        vocabulary such as the synthetic language's, where a word may be unseen in training).
        Ids follow descending count, ties broken by the token string.
        """
        words = list(counter)
        return cls.from_counts(
            words, np.fromiter((counter[w] for w in words), dtype=np.int64, count=len(words)), min_freq, max_vocab
        )[0]

    @classmethod
    def from_counts(
        cls, types: list[str], counts: np.ndarray, min_freq: int = 1, max_vocab: int | None = None
    ) -> tuple["Vocab", np.ndarray]:
        """:meth:`build` of the distinct ``types`` seen ``counts: (n,)`` times, and ``(n,)`` int64:
        the id of each type (``<unk>``'s for a dropped one).

        Sorted with arrays (the string order once, by Python's ``sorted``, then a stable numpy
        argsort by count), so that the 2.4M training types of the billion-word corpus take
        seconds; ``<eos>`` and ``<unk>`` are then put where the key ``(-count, token)`` places them.
        """
        if min_freq < 0:
            raise ValueError(f"min_freq must be >= 0, got {min_freq}")
        if max_vocab is not None and max_vocab < 2:
            raise ReglmError(f"max_vocab={max_vocab} must be >= 2 (room for {EOS} and {UNK})")
        counts = np.asarray(counts, dtype=np.int64)
        where = {t: types.index(t) for t in (EOS, UNK) if t in types}
        by_string = np.array(sorted(range(len(types)), key=types.__getitem__), dtype=np.int64)
        ranked = by_string[np.argsort(-counts[by_string], kind="stable")]
        ranked = ranked[~np.isin(ranked, list(where.values()))]
        kept = ranked[counts[ranked] >= min_freq]
        has_unk = (UNK in where and counts[where[UNK]] > 0) or kept.size < ranked.size
        if max_vocab is not None:
            room = max_vocab - 1 - int(has_unk)
            if kept.size > room and not has_unk:
                has_unk = True
                room -= 1
            kept = kept[:room]
        kept_counts = counts[kept]
        dropped = ranked[kept.size :] if max_vocab is not None else ranked[counts[ranked] < min_freq]
        dropped = dropped[counts[dropped] > 0]
        specials = {EOS: int(counts[where[EOS]]) if EOS in where else 0}
        if has_unk:
            specials[UNK] = int(counts.sum()) - int(kept_counts.sum()) - specials[EOS]
        itos = [types[i] for i in kept]
        at = {}
        for token, count in specials.items():
            lo = int(np.searchsorted(-kept_counts, -count, side="left"))
            hi = int(np.searchsorted(-kept_counts, -count, side="right"))
            at[token] = bisect.bisect_left(itos, token, lo, hi)
        order = sorted(specials, key=lambda t: (at[t], -specials[t], t))
        ids = np.arange(kept.size) + np.searchsorted(
            np.array([at[t] for t in order]), np.arange(kept.size), side="right"
        )
        table = np.full(len(types), -1, dtype=np.int64)
        table[kept] = ids
        all_counts = kept_counts.tolist()
        for k, token in enumerate(order):
            position = at[token] + k
            itos.insert(position, token)
            all_counts.insert(position, specials[token])
        unknown = (int(dropped.size), int(counts[dropped].sum())) if has_unk else (0, 0)
        vocab = cls(itos, all_counts, *unknown)
        for token, i in where.items():
            table[i] = vocab.stoi.get(token, -1)
        if has_unk:
            table[table < 0] = vocab.stoi[UNK]
        return vocab, table

    @property
    def eos_id(self) -> int:
        return self.stoi[EOS]

    @property
    def unk_id(self) -> int | None:
        return self.stoi.get(UNK)

    def unknown_types(self) -> int:
        """How many word types ``<unk>`` stands for: the recorded dropped types plus one per
        occurrence of ``<unk>`` the training text already held (at least 1)."""
        if self.unk_id is None:
            return 1
        return max(1, self.unk_types + self.counts[self.unk_id] - self.unk_tokens)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: object) -> bool:
        return token in self.stoi

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Vocab):
            return NotImplemented
        return self.itos == other.itos and self.counts == other.counts

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, unk={self.unk_id is not None})"

    def encode(self, tokens: list[str]) -> list[int]:
        """Ids of ``tokens`` (length preserved); unknown words become ``<unk>``.

        Raises :class:`UnknownWordError` (a ``KeyError``) with the first unknown word and its
        position when the vocabulary has no ``<unk>``.
        """
        stoi = self.stoi
        try:
            return [stoi[t] for t in tokens]
        except KeyError:
            unk = self.unk_id
            if unk is None:
                position = next(p for p, t in enumerate(tokens) if t not in stoi)
                raise UnknownWordError(tokens[position], position) from None
            return [stoi.get(t, unk) for t in tokens]

    def decode(self, ids: list[int]) -> list[str]:
        """Tokens of ``ids``."""
        return [self.itos[i] for i in ids]

    def fingerprint(self) -> str:
        """sha256 (hex) of the tokens in id order joined by newlines; equal iff the id maps agree."""
        return hashlib.sha256("\n".join(self.itos).encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        """Write ``token<TAB>count`` lines in id order (the ``<unk>`` line with the unknown types
        and tokens when words were dropped), atomically (temp file + ``os.replace``)."""
        path = Path(path)
        for tok in self.itos:
            if not tok or "\t" in tok or "\n" in tok:
                raise ValueError(f"token {tok!r} cannot be stored in {path}")
        extra = f"\t{self.unk_types}\t{self.unk_tokens}" if self.unk_tokens else ""
        text = "".join(f"{tok}\t{count}{extra if tok == UNK else ''}\n" for tok, count in zip(self.itos, self.counts))
        write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        """Read a file written by :meth:`save`; a malformed file raises :class:`ReglmError`."""
        path = Path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ReglmError(f"vocabulary file {path} is missing; point to the vocab.txt of the run") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ReglmError(f"vocabulary file {path} is not valid UTF-8; it is damaged, restore it") from None
        itos: list[str] = []
        counts: list[int] = []
        unknown = (0, 0)
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        for lineno, line in enumerate(lines, 1):
            parts = line.split("\t")
            if parts[0] == UNK and len(parts) == 4 and _COUNT.fullmatch(parts[2]) and _COUNT.fullmatch(parts[3]):
                unknown = (int(parts[2]), int(parts[3]))
                parts = parts[:2]
            if len(parts) != 2 or not parts[0] or not _COUNT.fullmatch(parts[1]):
                raise ReglmError(
                    f"vocabulary file {path} is malformed at line {lineno} "
                    "(expected token<TAB>count, the count in at most 18 ASCII digits); "
                    "it is damaged, restore it"
                )
            itos.append(parts[0])
            counts.append(int(parts[1]))
        if EOS not in itos or len(set(itos)) != len(itos):
            raise ReglmError(f"vocabulary file {path} lacks {EOS} or repeats a token; it is damaged, restore it")
        try:
            return cls(itos, counts, *unknown)
        except ValueError:
            raise ReglmError(
                f"vocabulary file {path}: the unknown types and tokens on its {UNK} line exceed its count; "
                "it is damaged, restore it"
            ) from None
