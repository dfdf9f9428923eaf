"""The word rule in numpy: a text file read in 8 MB pieces cut at line ends, its whitespace found
by comparisons over the bytes (ASCII and the Unicode spaces ``str.split`` splits on), and its word
types kept in a numpy hash table (:class:`WordTypes`) whose keys are exact for words of up to 15
bytes and are checked against the stored bytes beyond. The ids are those of the line-by-line rule
of :mod:`reglm.data.corpus` (:func:`reglm.data.corpus.read_tokens`, the plain-Python reference);
:mod:`reglm.data.cache` writes them to files once and maps them afterwards."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from reglm.data.bpe import WHITESPACE
from reglm.data.vocab import EOS, UNK
from reglm.errors import ReglmError

CHUNK_BYTES = 1 << 23
"""Bytes read per step (cut back to the last line end): large enough that numpy's per-call cost
vanishes, small enough that a step's temporaries stay in tens of megabytes."""

_WIDE = [chr(c).encode("utf-8") for c in WHITESPACE if c >= 0x80]
_WIDE_SPACE_2 = np.array([int.from_bytes(b, "big") for b in _WIDE if len(b) == 2])
_WIDE_SPACE_3 = np.array([int.from_bytes(b, "big") for b in _WIDE if len(b) == 3])
"""The UTF-8 forms (as big-endian integers) of the code points above ASCII that ``str.split``
splits on: 2 bytes (lead 0xC2) and 3 bytes (leads 0xE1..0xE3)."""
_U64 = np.uint64(64)
_S56 = np.uint64(56)
_GOLDEN, _ODD = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD6E8FEB86659FD93)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_HASHED = np.uint64(0xFF << 56)
_LOW56 = np.uint64((1 << 56) - 1)


def _mix(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (products wrap mod 2**64)."""
    z = z ^ (z >> _S30)
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    return z ^ (z >> _S31)


def _gather(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[index]`` for indices known to be in range: ``np.take`` with ``mode="wrap"`` skips
    the bounds check of indexing, which is a third of a gather's time here."""
    return np.take(values, index, mode="wrap")


def _low(words: np.ndarray, n: np.ndarray) -> np.ndarray:
    """The low ``n`` bytes (0..8, uint64) of each little-endian word, the others zeroed."""
    shift = _U64 - 8 * n
    return (words << shift) >> shift


class _Words:
    """The words of one buffer: where each starts, how long it is (bytes), and its key ``(k1, k2)``.

    ``k1`` holds bytes 0..7 of the word, ``k2`` bytes 8..14 and the length in its top byte, so for
    a word of at most 15 bytes equal keys are equal words. A longer word's ``k2`` is a hash of
    all its bytes with the top byte ``0xFF`` (no shorter word has that), so a match on it is
    checked against the bytes (:meth:`WordTypes.find` does). Bytes are read 8 at a time, by one
    unaligned gather from a uint64 view of the buffer with a stride of one byte (the buffer
    carries 16 bytes of padding; ``np.take`` would copy such a view, indexing does not).
    """

    def __init__(self, padded: bytes, n: int, starts: np.ndarray, lengths: np.ndarray) -> None:
        self.view = np.ndarray((n,), dtype="<u8", buffer=padded, strides=(1,))
        self.starts, self.lengths = starts, lengths
        size = lengths.astype(np.uint64)
        self.k1 = _low(self.view[starts], np.minimum(size, 8))
        self.k2 = size << _S56
        mid = np.flatnonzero(lengths > 8)
        if mid.size:
            self.k2[mid] |= _low(self.view[starts[mid] + 8], np.minimum(size[mid] - 8, 7))
            long = mid[lengths[mid] > 15]
            if long.size:
                h = _mix(self.k1[long] ^ (size[long] * _GOLDEN))
                more, j = np.arange(long.size), 1
                while more.size:
                    h[more] = _mix(h[more] + self.chunk(j, long[more]))
                    j += 1
                    more = more[lengths[long[more]] > 8 * j]
                self.k2[long] = (h & _LOW56) | _HASHED

    def chunk(self, j: int, rows: np.ndarray) -> np.ndarray:
        """Bytes ``8j .. 8j+7`` of the words ``rows`` (each longer than ``8j`` bytes), as a word."""
        if j == 0:
            return self.k1[rows]
        return _low(self.view[self.starts[rows] + 8 * j], np.minimum(self.lengths[rows] - 8 * j, 8).astype(np.uint64))


def _tokens(data: bytes) -> tuple[_Words, np.ndarray]:
    """The words of ``data`` (whole lines, each ending with ``\\n``) under the rule, and where its
    line ends are: ``(words, newlines)``.

    Whitespace is what ``str.split`` splits on: bytes up to 0x20 are whitespace but for the
    control characters among them, and the multi-byte whitespace characters are searched only
    when ``data`` is not ASCII; the words are the non-empty gaps between whitespace bytes.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    spaces = np.flatnonzero(buf <= 0x20)
    seen = _gather(buf, spaces)
    control = (seen < 0x09) | ((seen > 0x0D) & (seen < 0x1C))
    if control.any():
        spaces, seen = spaces[~control], seen[~control]
    if not data.isascii():
        lead = np.flatnonzero((buf[:-2] == 0xC2) | ((buf[:-2] >= 0xE1) & (buf[:-2] <= 0xE3)))
        if lead.size:
            code = (buf[lead].astype(np.int64) << 16) | (buf[lead + 1].astype(np.int64) << 8) | buf[lead + 2]
            two = lead[np.isin(code >> 8, _WIDE_SPACE_2)]
            three = lead[np.isin(code, _WIDE_SPACE_3)]
            if two.size or three.size:
                spaces = np.sort(np.concatenate([spaces, two, two + 1, three, three + 1, three + 2]))
                seen = _gather(buf, spaces)
    before = np.empty_like(spaces)
    before[0], before[1:] = -1, spaces[:-1]
    gaps = spaces - before - 1
    word = gaps > 0
    words = _Words(data + bytes(16), buf.size, np.compress(word, before) + 1, np.compress(word, gaps))
    return words, np.compress(seen == 0x0A, spaces)


def _words_of(tokens: Sequence[str]) -> _Words:
    """The words of a list of strings (none holds whitespace that splits it: each is one word)."""
    raw = [t.encode("utf-8") for t in tokens]
    lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
    blob = b"".join(raw)
    return _Words(blob + bytes(16), len(blob), np.cumsum(lengths) - lengths, lengths)


class WordTypes:
    """The word types seen so far, each with an id: an open-addressing hash table in numpy arrays.

    Lookups and insertions take a whole buffer's words at once (:meth:`find`, :meth:`add`). A
    word's key (:class:`_Words`) picks a slot by multiplicative hashing, then linear probing; a
    slot matches when it holds the word's key and, for a word longer than 15 bytes, the type's
    stored bytes equal the word's, so equal ids always mean equal words. Words that claim the
    same empty slot at once race for it (the winner is read back), so nothing is sorted. The
    table is kept at most half full and doubles when needed (fuller, the extra probes cost more
    than a smaller table saves; the slots of WikiText-103's 267,735 types take 20 MB).
    """

    def __init__(self) -> None:
        self.bits = 16
        self.slot_k1 = np.zeros(1 << self.bits, dtype=np.uint64)
        self.slot_k2 = np.zeros(1 << self.bits, dtype=np.uint64)
        self.slot_ids = np.zeros(1 << self.bits, dtype=np.int32)
        self.size = 0
        self._k1 = np.zeros(0, dtype=np.uint64)
        self._k2 = np.zeros(0, dtype=np.uint64)
        self._lengths = np.zeros(0, dtype=np.int64)
        self._offsets = np.zeros(0, dtype=np.int64)
        self._pool = np.zeros(1 << 16, dtype=np.uint64)
        self._pool_used = 0

    @classmethod
    def of(cls, tokens: Sequence[str]) -> WordTypes:
        """The distinct ``tokens`` as types ``0 .. len(tokens) - 1``, in that order (an empty
        token, which no word equals, keeps its id but is never found)."""
        words = _words_of(tokens)
        types = cls()
        types._reserve(len(tokens))
        ids = types._store(words, np.arange(len(tokens)))
        kept = np.flatnonzero(words.lengths > 0)
        types._place(words.k1[kept], words.k2[kept], ids[kept])
        return types

    def merge(self, tokens: Sequence[str]) -> np.ndarray:
        """The id of each of the distinct, non-empty ``tokens`` (another table's types), adding
        those that are new: ``(len(tokens),)`` int64."""
        words = _words_of(tokens)
        ids = self.find(words)
        self.add(words, ids)
        return ids

    def _slots(self, k1: np.ndarray, k2: np.ndarray) -> np.ndarray:
        return (((k1 ^ (k2 * _ODD)) * _GOLDEN) >> np.uint64(64 - self.bits)).astype(np.int64)

    def find(self, words: _Words) -> np.ndarray:
        """The id of each word, ``-1`` where it is not a type."""
        slots = self._slots(words.k1, words.k2)
        k2 = _gather(self.slot_k2, slots)
        hit = (k2 == words.k2) & (_gather(self.slot_k1, slots) == words.k1)
        found = _gather(self.slot_ids, slots)
        check = np.flatnonzero(hit & (words.lengths > 15))
        if check.size:
            hit[check] = self._same(found[check], words, check)
        found[~hit] = -1
        going = np.flatnonzero(~hit & (k2 != 0))
        mask = (1 << self.bits) - 1
        slots = (slots[going] + 1) & mask
        while going.size:
            k2 = _gather(self.slot_k2, slots)
            ids = _gather(self.slot_ids, slots)
            hit = (k2 == words.k2[going]) & (_gather(self.slot_k1, slots) == words.k1[going])
            check = np.flatnonzero(hit & (words.lengths[going] > 15))
            if check.size:
                hit[check] = self._same(ids[check], words, going[check])
            found[going[hit]] = ids[hit]
            on = np.flatnonzero(~hit & (k2 != 0))
            going, slots = going[on], (slots[on] + 1) & mask
        return found

    def add(self, words: _Words, found: np.ndarray) -> None:
        """Give every word that ``found`` (from :meth:`find`) marks ``-1`` its type's id, in place,
        making new types of the words that have none (their ids in no particular order)."""
        rows = np.flatnonzero(found < 0)
        mask = (1 << self.bits) - 1
        slots = self._slots(words.k1[rows], words.k2[rows])
        while rows.size:
            empty = np.flatnonzero(_gather(self.slot_k2, slots) == 0)
            if empty.size:
                claimed = slots[empty]
                self.slot_ids[claimed] = -2 - empty
                won = empty[self.slot_ids[claimed] == -2 - empty]
                if self._reserve(won.size):  # the table grew: every word starts over at its new slot
                    mask = (1 << self.bits) - 1
                    slots = self._slots(words.k1[rows], words.k2[rows])
                    continue
                ids = self._store(words, rows[won])
                self.slot_k1[slots[won]], self.slot_k2[slots[won]], self.slot_ids[slots[won]] = (
                    words.k1[rows[won]],
                    words.k2[rows[won]],
                    ids,
                )
            k2 = _gather(self.slot_k2, slots)
            ids = _gather(self.slot_ids, slots)
            hit = (k2 == words.k2[rows]) & (_gather(self.slot_k1, slots) == words.k1[rows])
            check = np.flatnonzero(hit & (words.lengths[rows] > 15))
            if check.size:
                hit[check] = self._same(ids[check], words, rows[check])
            found[rows[hit]] = ids[hit]
            on = np.flatnonzero(~hit)
            rows, slots = rows[on], (slots[on] + 1) & mask

    def _same(self, ids: np.ndarray, words: _Words, rows: np.ndarray) -> np.ndarray:
        """Whether each word ``rows`` (longer than 15 bytes) has the bytes of type ``ids``."""
        lengths = words.lengths[rows]
        offsets = self._offsets[ids]
        same = self._lengths[ids] == lengths
        more, j = np.flatnonzero(same), 0
        while more.size:
            same[more] = self._pool[offsets[more] + j] == words.chunk(j, rows[more])
            j += 1
            more = more[same[more] & (lengths[more] > 8 * j)]
        return same

    def _reserve(self, n: int) -> bool:
        """Room for ``n`` more types, the table at most half full; whether it had to grow (rehashed)."""
        bits = self.bits
        while 2 * (self.size + n) > (1 << bits):
            bits += 1
        if bits == self.bits:
            return False
        self.bits = bits
        self.slot_k1 = np.zeros(1 << bits, dtype=np.uint64)
        self.slot_k2 = np.zeros(1 << bits, dtype=np.uint64)
        self.slot_ids = np.zeros(1 << bits, dtype=np.int32)
        kept = np.flatnonzero(self._lengths > 0)
        self._place(self._k1[kept], self._k2[kept], kept)
        return True

    def _store(self, words: _Words, rows: np.ndarray) -> np.ndarray:
        """Record the words ``rows`` as the types ``size, size + 1, ...`` (not yet in the table); their ids."""
        lengths = words.lengths[rows]
        count = np.maximum((lengths + 7) // 8, 1)
        offsets = self._pool_used + np.cumsum(count) - count
        self._pool_used += int(count.sum())
        if self._pool_used > self._pool.size:
            self._pool = np.concatenate([self._pool, np.zeros(max(self._pool_used, self._pool.size), dtype=np.uint64)])
        for j in range(int(count.max(initial=0))):
            sel = np.flatnonzero(count > j)
            self._pool[offsets[sel] + j] = words.chunk(j, rows[sel])
        self._k1 = np.concatenate([self._k1, words.k1[rows]])
        self._k2 = np.concatenate([self._k2, words.k2[rows]])
        self._lengths = np.concatenate([self._lengths, lengths])
        self._offsets = np.concatenate([self._offsets, offsets])
        ids = np.arange(self.size, self.size + rows.size)
        self.size += rows.size
        return ids

    def _place(self, k1: np.ndarray, k2: np.ndarray, ids: np.ndarray) -> None:
        """Put distinct keys (not in the table) into free slots."""
        mask = (1 << self.bits) - 1
        slots = self._slots(k1, k2)
        pending = np.arange(ids.size)
        while pending.size:
            at = slots[pending]
            free = np.flatnonzero(_gather(self.slot_k2, at) == 0)
            self.slot_ids[at[free]] = -2 - free
            won = free[self.slot_ids[at[free]] == -2 - free]
            placed, where = pending[won], at[won]
            self.slot_k1[where], self.slot_k2[where], self.slot_ids[where] = k1[placed], k2[placed], ids[placed]
            left = np.ones(pending.size, dtype=bool)
            left[won] = False
            pending = pending[left]
            slots[pending] = (slots[pending] + 1) & mask

    def tokens(self) -> list[str]:
        """Every type's string, in id order."""
        raw = self._pool[: self._pool_used].view(np.uint8).tobytes()
        spans = zip((8 * self._offsets).tolist(), (8 * self._offsets + self._lengths).tolist())
        if raw.isascii():
            text = raw.decode("ascii")
            return [text[a:b] for a, b in spans]
        return [raw[a:b].decode("utf-8") for a, b in spans]


def _chunks(
    path: Path, progress: bool, desc: str, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """``(offset, data)`` for consecutive pieces of a UTF-8 file (bytes ``start .. stop``, where
    ``start`` and ``stop`` are line starts), each of whole lines ending with ``\n`` (one is added
    to a last line without it), the byte-order mark at the file's start dropped; ``offset`` is
    where ``data`` starts in the file. Invalid UTF-8 is a ReglmError naming the line."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise ReglmError(f"{path} does not exist; check the path") from None
    with f:
        stop = os.fstat(f.fileno()).st_size if stop is None else stop
        f.seek(start)
        with tqdm(total=stop - start, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False) as bar:
            offset, rest = start, b""
            while True:
                block = f.read(min(CHUNK_BYTES, stop - f.tell()))
                bar.update(len(block))
                data = rest + block
                if block:
                    cut = data.rfind(b"\n") + 1
                    data, rest = data[:cut], data[cut:]
                elif data and not data.endswith(b"\n"):
                    data += b"\n"
                at = offset
                offset += len(data)
                if at == 0 and data.startswith(b"\xef\xbb\xbf"):
                    data, at = data[3:], 3
                if data:
                    try:
                        data.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise ReglmError(
                            f"{path} is not valid UTF-8 at line {line_of(path, at + exc.start)}; re-encode the "
                            "file as UTF-8"
                        ) from None
                    yield at, data
                if not block:
                    return


def line_of(path: Path, offset: int) -> int:
    """The 1-based number of the line holding byte ``offset`` of a file (for error messages)."""
    lines = 1
    with open(path, "rb") as f:
        while offset > 0:
            block = f.read(min(CHUNK_BYTES, offset))
            if not block:
                break
            lines += block.count(b"\n")
            offset -= len(block)
    return lines


def encode_chunks(
    path: str | Path,
    types: WordTypes,
    eos: int,
    unk: int | None = None,
    grow: bool = False,
    dtype: Any = np.int64,
    progress: bool = False,
    desc: str = "encoding",
    start: int = 0,
    stop: int | None = None,
    require_words: bool = True,
) -> Generator[np.ndarray, None, int]:
    """The id stream of a file (or of its bytes ``start .. stop``, at line starts) under the rule,
    in pieces: every word's id in ``types`` and ``eos`` at every line end.

    ``grow``: words that are not types yet become new types (ids in no particular order);
    otherwise such a word is ``unk``, or, without one, a ReglmError naming the word and its line.
    With ``require_words``, a file without words (empty or blank) is a ReglmError once it is read
    to the end; the generator's return value is how many words it read.
    """
    path = Path(path)
    n_words = 0
    for at, data in _chunks(path, progress, desc, start, stop):
        words, newlines = _tokens(data)
        ids = types.find(words)
        if grow:
            types.add(words, ids)
        elif (ids < 0).any():
            if unk is None:
                first = int(np.flatnonzero(ids < 0)[0])
                begin = int(words.starts[first])
                word = data[begin : begin + int(words.lengths[first])].decode("utf-8")
                raise ReglmError(
                    f"{path} line {line_of(path, at + begin)}: word {word!r} is not in the training vocabulary, "
                    f"which has no {UNK}; "
                    f"add {UNK} to the training data, or pass --min-freq/--max-vocab so that {UNK} exists"
                )
            ids[ids < 0] = unk
        ends = np.zeros(ids.size + newlines.size, dtype=bool)
        ends[np.searchsorted(words.starts, newlines) + np.arange(newlines.size)] = True
        out = np.empty(ends.size, dtype=dtype)
        out[ends] = eos
        out[~ends] = ids
        n_words += ids.size
        yield out
    if require_words and n_words == 0:
        raise ReglmError(f"{path} holds no words (it is empty or blank); put the split's text in it")
    return n_words


def count_file(
    path: str | Path, types: bool = False, progress: bool = False, desc: str = "counting"
) -> tuple[int, int | None]:
    """``(tokens, word types)`` of a file under the rule (types ``<eos>`` included; ``None``
    unless ``types``), without keeping its ids."""
    table = WordTypes.of([EOS]) if types else None
    tokens = 0
    for _, data in _chunks(Path(path), progress, desc):
        words, newlines = _tokens(data)
        tokens += words.starts.size + newlines.size
        if table is not None:
            table.add(words, table.find(words))
    return tokens, None if table is None else table.size


def type_stream(path: Path) -> tuple[list[str], np.ndarray]:
    """``(types, ids)``: the word types of a file (``<eos>`` first, the others in no particular
    order) and its token stream under the rule as indices into them, ``ids: (N,)`` int64."""
    types = WordTypes.of([EOS])
    ids = np.concatenate(list(encode_chunks(path, types, eos=0, grow=True)))
    return types.tokens(), ids
