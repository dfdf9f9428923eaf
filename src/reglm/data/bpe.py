"""Sub-word units: a byte-pair encoding learnt on the training words, scored per word.

Baevski & Auli (2019), section 4.4: "We learn a byte-pair encoding (BPE) of 32K codes on the
training data ... The final evaluation is in terms of word-level perplexity ... The probability
of a word is the product of the sub-word units." BPE is Sennrich et al. (2016); the learning and
the segmentation are done by the Hugging Face ``tokenizers`` library (``pip install
"reglm[bpe]"``), whose ``tokenizer.json`` is what a model directory ships.

Our reading:

* **Words first.** The text is cut into words by the corpus rule (:mod:`reglm.data.corpus`:
  whitespace as ``str.split`` sees it, one ``<eos>`` after every line); BPE segments each word on
  its own and never merges across words. The tokenizer's pre-tokenizer splits on exactly the
  characters ``str.isspace`` accepts, so applied to a line it sees the same words.
* **Training data**: the training split's words with their counts; ``<eos>`` and ``<unk>`` are
  special units (added tokens of the tokenizer), never segmented and not fed to the learner.
* **Continuation scheme**: Sennrich et al.'s Algorithm 1 marks the end of a word with ``</w>``:
  the last unit of a word carries the suffix (``low</w>``, ``lo`` ``west</w>``), units inside a
  word do not, so the units of a word re-join to it by concatenation minus the suffix. A
  character never seen in training (at that place: inside a word, or at its end) becomes
  ``<unk>``. Word boundaries are also tracked structurally while encoding (each word is
  segmented on its own), which is what :func:`encode` uses for the ``word_ends`` mask, so they
  stay exact even for an ``<unk>`` at the end of a word.
* **Size**: ``vocab_size`` counts every unit (the characters with and without ``</w>``, the
  merged units, ``<unk>`` and ``<eos>``), which is how ``tokenizers`` counts it; it is about the
  number of merges ("codes" in the paper) plus the alphabet. The alphabet is always kept, so a
  small setting may give more units; a text with few repeated pairs may give fewer. Pairs seen
  fewer than twice are not merged (``subword-nmt``'s default ``--min-frequency 2``).
* **Ids**: the unit vocabulary is a :class:`~reglm.data.vocab.Vocab` ordered by descending
  training count, ties broken by the unit string, like word vocabularies (frequency bands of
  adaptive inputs / softmax still work), and the saved ``tokenizer.json`` uses these same ids:
  ``Tokenizer.from_file("tokenizer.json").encode(line).ids`` are the model's input ids (append
  the ``<eos>`` id for the end of the line).
* **Word level**: ``<eos>`` is a word of its own, as for word models, so the words of a split are
  its tokens under the word rule; ``word_ends`` is ``True`` on the unit that closes each word.

Deterministic: the same training text and ``vocab_size`` give the same merges, units and ids.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reglm.data.vocab import EOS, UNK, Vocab
from reglm.errors import ReglmError
from reglm.io import write_text

SUFFIX = "</w>"
"""Marks the unit that ends a word (Sennrich et al. 2016, Algorithm 1)."""
SPECIALS = (UNK, EOS)
MIN_MERGE_COUNT = 2
"""Pairs seen fewer times in training are not merged (subword-nmt's default)."""
_CHUNK = 4096
_CACHE_LIMIT = 1 << 20


def require_tokenizers() -> Any:
    """The ``tokenizers`` module, or a ReglmError saying how to install it."""
    try:
        import tokenizers
    except ImportError:
        raise ReglmError(
            "BPE (data.tokenizer=bpe, or a model with a tokenizer.json) needs the Hugging Face tokenizers library; "
            'pip install "reglm[bpe]"'
        ) from None
    return tokenizers


WHITESPACE = (
    0x09,
    0x0A,
    0x0B,
    0x0C,
    0x0D,
    0x1C,
    0x1D,
    0x1E,
    0x1F,
    0x20,
    0x85,
    0xA0,
    0x1680,
    *range(0x2000, 0x200B),
    0x2028,
    0x2029,
    0x202F,
    0x205F,
    0x3000,
)
"""The code points ``str.isspace`` accepts, i.e. what ``str.split()`` splits on (Rust's
``char::is_whitespace``, behind ``tokenizers``' ``WhitespaceSplit``, lacks U+001C..U+001F)."""


def whitespace_pattern() -> str:
    """An Oniguruma pattern for runs of :data:`WHITESPACE` (the tokenizer's word separators)."""
    return "[" + "".join(f"\\x{{{c:x}}}" for c in WHITESPACE) + "]+"


def _pipeline(model: Any, learner: bool = False) -> Any:
    """A ``tokenizers.Tokenizer`` around the BPE ``model``: whitespace words, ``</w>`` decoding, the
    specials. The ``learner`` only ever sees words joined by single spaces and splits on those
    with the faster ``WhitespaceSplit``; the tokenizer that is kept splits exactly like ``str.split``."""
    tk = require_tokenizers()
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = (
        tk.pre_tokenizers.WhitespaceSplit()
        if learner
        else tk.pre_tokenizers.Split(tk.Regex(whitespace_pattern()), "removed")
    )
    tok.decoder = tk.decoders.BPEDecoder(suffix=SUFFIX)
    tok.add_special_tokens(list(SPECIALS))
    return tok


def _merges(tokenizer: Any) -> list[tuple[str, str]]:
    """The merge list of a BPE tokenizer, in rank order (both ``"a b"`` and ``["a", "b"]`` forms)."""
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _repeated(words: Sequence[tuple[str, int]]) -> Iterator[str]:
    """Each word ``count`` times, in space-separated chunks: the training text the learner counts."""
    for word, count in words:
        while count > 0:
            k = min(count, _CHUNK)
            yield " ".join([word] * k)
            count -= k


def _segment(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """The unit ids (of ``tokenizer``) of every word (no whitespace in it), each segmented on its own."""
    if not words:
        return []
    out = [enc.ids for enc in tokenizer.encode_batch(list(words), add_special_tokens=False)]
    for word, ids in zip(words, out):
        if not ids:
            raise RuntimeError(f"the BPE tokenizer gave no unit for the word {word!r}")
    return out


def _flatten(units: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """``(flat, lengths)``: the concatenated ids of every word and how many each has."""
    lengths = np.fromiter((len(u) for u in units), dtype=np.int64, count=len(units))
    flat = np.fromiter((i for u in units for i in u), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


class BPEVocab(Vocab):
    """The vocabulary of a BPE model's units plus the tokenizer that segments words into them.

    A :class:`~reglm.data.vocab.Vocab` (ids by training count; saved as ``vocab.txt``) whose
    ``hf_tokenizer`` (a ``tokenizers.Tokenizer``, saved as ``tokenizer.json``) maps every unit
    to the same id. Build one with :meth:`train` or :meth:`from_tokenizer_file`.
    """

    def __init__(self, itos: list[str], counts: list[int], hf_tokenizer: Any, source: str = "the tokenizer") -> None:
        super().__init__(itos, counts)
        self.hf_tokenizer = hf_tokenizer
        _check_tokenizer(hf_tokenizer, self, source)
        self._cache: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"BPEVocab(size={len(self)})"

    def unknown_types(self) -> int:
        """1: a sub-word vocabulary maps no word to ``<unk>`` (an unseen character is the ``<unk>``
        unit), so scoring has no unknown class to share (:func:`reglm.evaluate.words.oov_offset`)."""
        return 1

    @classmethod
    def train(cls, word_counts: Mapping[str, int], vocab_size: int) -> BPEVocab:
        """Learn the units of a training text from its word counts (``<eos>`` / ``<unk>`` included
        as words: they count as their special units). ``vocab_size``: see the module docstring."""
        tk = require_tokenizers()
        learner = _pipeline(tk.models.BPE(unk_token=UNK, end_of_word_suffix=SUFFIX), learner=True)
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=MIN_MERGE_COUNT,
            special_tokens=list(SPECIALS),
            end_of_word_suffix=SUFFIX,
            show_progress=False,
        )
        words = sorted((w, int(c)) for w, c in word_counts.items() if w not in SPECIALS and c > 0)
        learner.train_from_iterator(_repeated(words), trainer, length=sum(-(-c // _CHUNK) for _, c in words))
        types = sorted(word_counts)
        flat, lengths = _flatten(_segment(learner, types))
        weights = np.repeat(np.array([int(word_counts[w]) for w in types], dtype=np.float64), lengths)
        learnt = learner.get_vocab(with_added_tokens=True)
        counts = np.rint(np.bincount(flat, weights=weights, minlength=len(learnt))).astype(np.int64)
        count_of = {unit: int(counts[i]) for unit, i in learnt.items()}
        itos = sorted(learnt, key=lambda u: (-count_of[u], u))
        stoi = {u: i for i, u in enumerate(itos)}
        model = tk.models.BPE(vocab=stoi, merges=_merges(learner), unk_token=UNK, end_of_word_suffix=SUFFIX)
        return cls(itos, [count_of[u] for u in itos], _pipeline(model))

    @classmethod
    def from_tokenizer_file(cls, vocab: Vocab, path: str | Path) -> BPEVocab:
        """``vocab`` (a ``vocab.txt``) with the tokenizer saved at ``path``; a file that is not a
        reglm BPE tokenizer, or whose units and ids differ from ``vocab``'s, is a ReglmError."""
        tk = require_tokenizers()
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ReglmError(
                f"{path} is missing; a BPE model needs the tokenizer.json it was trained with (copy it from the "
                "run's model directory)"
            ) from None
        except UnicodeDecodeError:
            raise ReglmError(
                f"{path} is not valid UTF-8; it is damaged, restore the model's own tokenizer.json"
            ) from None
        try:
            spec = json.loads(text)
            model = spec["model"]
            ok = (
                model.get("type") == "BPE"
                and model.get("end_of_word_suffix") == SUFFIX
                and model.get("unk_token") == UNK
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # RecursionError: nested too deep
            ok = False
        if not ok:
            raise ReglmError(
                f"{path} is not a reglm BPE tokenizer (a tokenizers BPE model with end-of-word suffix {SUFFIX} and "
                f"{UNK}); restore the model's own tokenizer.json"
            )
        try:
            hf = tk.Tokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises plain Exceptions for a bad file
            raise ReglmError(
                f"{path} cannot be read by tokenizers ({str(exc)[:160]}); restore the model's own tokenizer.json"
            ) from None
        return cls(vocab.itos, vocab.counts, hf, str(path))

    # ----------------------------------------------------------------------------------- encoding
    def word_units(self, words: Sequence[str]) -> list[tuple[int, ...]]:
        """The unit ids of each word (at least one each; ``<eos>`` and ``<unk>`` are one unit)."""
        cache = self._cache
        missing = sorted({w for w in words if w not in cache})
        if missing:
            if len(cache) + len(missing) > _CACHE_LIMIT:
                cache.clear()
            cache.update(zip(missing, map(tuple, _segment(self.hf_tokenizer, missing))))
        return [cache[w] for w in words]

    def encode_words(self, words: Sequence[str]) -> tuple[list[int], list[bool]]:
        """``(ids, word_ends)`` of a word sequence: the units of each word in order and, for
        each unit, whether it closes its word."""
        ids: list[int] = []
        ends: list[bool] = []
        for units in self.word_units(words):
            ids.extend(units)
            ends.extend([False] * (len(units) - 1))
            ends.append(True)
        return ids, ends

    def encode_stream(
        self, types: Sequence[str], type_ids: np.ndarray, chunk: int = 1 << 22
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, word_ends)``, both ``(N,)`` (int64, bool), of a word stream given as the index
        ``type_ids: (W,)`` into its word types ``types``; ``word_ends.sum() == W``."""
        flat, lengths = _flatten(_segment(self.hf_tokenizer, list(types)))
        last = np.zeros(flat.shape[0], dtype=bool)
        last[np.cumsum(lengths) - 1] = True
        offsets = np.cumsum(lengths) - lengths
        ids_parts, end_parts = [], []
        for lo in range(0, type_ids.shape[0], chunk):
            t = type_ids[lo : lo + chunk]
            n = lengths[t]
            starts = np.repeat(offsets[t] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
            ids_parts.append(flat[starts])
            end_parts.append(last[starts])
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64)
        ends = np.concatenate(end_parts) if end_parts else np.zeros(0, dtype=bool)
        return torch.from_numpy(ids), torch.from_numpy(ends)

    def units(self, word: str) -> list[str]:
        """The unit strings of one word, e.g. ``["lo", "west</w>"]``."""
        return self.decode(list(self.word_units([word])[0]))

    def join(self, ids: Iterable[int], word_ends: Iterable[bool] | None = None) -> list[str]:
        """The words of a unit sequence: units concatenated up to each word end, ``</w>`` dropped.

        With ``word_ends`` (from :meth:`encode_words` or :meth:`encode_stream`) a word ends exactly
        where it says; without it, at a unit carrying ``</w>`` and at ``<eos>`` (an ``<unk>`` that
        stands for an unseen last character then does not end its word).
        """
        ids = list(ids)
        ends = (
            [i == self.eos_id or self.itos[i].endswith(SUFFIX) for i in ids] if word_ends is None else list(word_ends)
        )
        words: list[str] = []
        current: list[str] = []
        for i, end in zip(ids, ends):
            unit = self.itos[i]
            current.append(unit[: -len(SUFFIX)] if unit.endswith(SUFFIX) else unit)
            if end:
                words.append("".join(current))
                current = []
        if current:
            words.append("".join(current))
        return words

    # ----------------------------------------------------------------------------------- files
    def tokenizer_json(self) -> str:
        """The tokenizer as the text of a ``tokenizer.json`` (what ``Tokenizer.save`` writes)."""
        return self.hf_tokenizer.to_str(pretty=True)

    def tokenizer_fingerprint(self) -> str:
        """sha256 (hex) of the merges in rank order: with the units and ids (:meth:`fingerprint`)
        they fix the segmentation; unlike the file's bytes, they do not change with the
        ``tokenizers`` version that wrote it."""
        return hashlib.sha256("\n".join(f"{a} {b}" for a, b in _merges(self.hf_tokenizer)).encode("utf-8")).hexdigest()

    def save_tokenizer(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically; ``tokenizers.Tokenizer.from_file(path)`` reads it."""
        write_text(Path(path), self.tokenizer_json())


def _check_tokenizer(hf: Any, vocab: Vocab, source: str) -> None:
    """A ReglmError unless ``hf`` maps exactly ``vocab``'s units to ``vocab``'s ids, with ``<unk>`` and ``<eos>``
    special."""
    have = hf.get_vocab(with_added_tokens=True)
    if have != vocab.stoi:
        extra = sorted(set(have) - set(vocab.stoi))
        lacking = sorted(set(vocab.stoi) - set(have))
        moved = sum(1 for u, i in have.items() if u in vocab.stoi and vocab.stoi[u] != i)
        detail = (
            f"{len(extra)} units only in the tokenizer, {len(lacking)} only in the vocabulary, {moved} with other ids"
        )
        raise ReglmError(
            f"{source} does not match the vocabulary ({len(have):,} units vs {len(vocab):,}: {detail}); "
            "a BPE model needs the tokenizer.json and vocab.txt saved together; restore both from the same run"
        )
    added = (
        {t.content for t in hf.get_added_tokens_decoder().values()}
        if hasattr(hf, "get_added_tokens_decoder")
        else set(SPECIALS)
    )
    if not set(SPECIALS) <= added:
        raise ReglmError(
            f"{source} does not treat {UNK} and {EOS} as special units; restore the model's own tokenizer.json"
        )


def is_subword(vocab: Vocab | None) -> bool:
    """Whether ``vocab`` is the unit vocabulary of a BPE model (it carries a tokenizer)."""
    return isinstance(vocab, BPEVocab)
