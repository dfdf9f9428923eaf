"""Word-level scores of sentences: a word's log-probability in the log base asked for, the
score of a word outside the vocabulary, and a sub-word model's units summed into words
(:class:`reglm.api.TrainedModel`'s scoring methods, ``reglm score``, ``reglm serve``).

Out-of-vocabulary words (``oov_penalty`` of the scoring methods, ``reglm score --oov-penalty``).
A word outside the vocabulary is read as ``<unk>``, which stands for every unknown word at once
and on most corpora is one of the most frequent tokens (about 5 % of PTB): its raw probability
would let a misspelt or made-up word outscore a correct one. The scoring methods therefore give
an OOV word, by default (``"share"``), ``log p(<unk>) - log n`` with ``n`` the number of word
types ``<unk>`` stands for (:meth:`reglm.data.vocab.Vocab.unknown_types`): the unknown class's
probability shared evenly among its words. ``oov_penalty=X`` (a number >= 0, in the units of
``base``) gives ``log p(<unk>) - X`` instead, the fixed offset decoders use (pyctcdecode's
``unk_score_offset=-10`` is ``X=10`` with ``base=10``); ``oov_penalty=None`` (or ``"none"``) the
raw ``log p(<unk>)``, the papers' perplexity protocol, which :meth:`reglm.api.TrainedModel.perplexity` and
``reglm eval`` keep. Only the OOV word's own score changes; the words after it are scored as
after ``<unk>``. Example: with ``p(<unk>) = 0.05`` at some position and ``n = 4``, ``"share"``
gives ``ln 0.05 - ln 4 = -4.382``, ``None`` gives ``ln 0.05 = -2.996``, and ``oov_penalty=2,
base=10`` gives ``log10 0.05 - 2 = -3.301``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from reglm.data.vocab import Vocab
from reglm.errors import ReglmError

OOV_SHARE = "share"
"""The default ``oov_penalty``: the unknown class's probability shared among its word types."""


class WordScore(NamedTuple):
    """One word of a scored sentence: the word as given, its log-probability, and whether it is
    out of the vocabulary (then scored as ``<unk>``)."""

    word: str
    log_prob: float
    oov: bool


def log_scale(base: str | int) -> float:
    """The factor that turns a natural log into a log of ``base`` (``"e"`` or ``10``)."""
    if base in ("e", "E"):
        return 1.0
    if base in (10, "10"):
        return 1.0 / math.log(10.0)
    raise ReglmError(f"log base {base!r} is not supported; use e (natural log) or 10 (KenLM's and most ASR decoders')")


def oov_offset(vocab: Vocab, oov_penalty: str | float | None, base: str | int = "e") -> float:
    """The natural-log amount an OOV word's ``log p(<unk>)`` gets under ``oov_penalty`` (see the
    module doc): ``-ln(unknown types)`` for ``"share"``, ``0`` for ``None``/``"none"``, ``-X`` in
    ``base`` units for a number ``X >= 0``."""
    if oov_penalty == OOV_SHARE:
        return -math.log(vocab.unknown_types())
    if oov_penalty is None or oov_penalty == "none":
        return 0.0
    try:
        value = float(oov_penalty)
    except (TypeError, ValueError):
        raise ReglmError(
            f"oov penalty {oov_penalty!r} is not share, none or a number; "
            "e.g. --oov-penalty 10 subtracts 10 (in --base units) per OOV word"
        ) from None
    if not (math.isfinite(value) and value >= 0):
        raise ReglmError(
            f"oov penalty {oov_penalty!r} must be a number >= 0: it is subtracted from log p(<unk>) "
            "(pyctcdecode's unk_score_offset=-10 is 10 with base 10)"
        )
    return -value / log_scale(base)


def describe_oov(vocab: Vocab, oov_penalty: str | float | None, base: str | int = "e") -> str:
    """How ``oov_penalty`` scores an OOV word, in words (the ``reglm score`` header)."""
    log = "log10" if log_scale(base) != 1.0 else "ln"
    if oov_penalty == OOV_SHARE:
        n = vocab.unknown_types()
        return f"{log} p(<unk>) - {log}({n}), the unknown class shared among its {n} word types"
    if oov_penalty is None or oov_penalty == "none":
        return f"{log} p(<unk>), the raw unknown class (the perplexity protocol)"
    return f"{log} p(<unk>) - {float(oov_penalty):g}, a fixed penalty"


def word_index(ends: Sequence[bool]) -> list[int]:
    """For every unit, the index of the word it belongs to (``ends`` marks each word's last unit)."""
    index, word = [], 0
    for end in ends:
        index.append(word)
        word += bool(end)
    return index


@dataclass
class SentenceUnits:
    """One sentence as the model reads it: its words (the last is ``<eos>``), the ids of their
    units, which unit closes each word, and which words are out of the vocabulary."""

    words: list[str]
    ids: list[int]
    ends: list[bool]
    oov: list[bool]

    def word_scores(
        self, unit_log_probs: torch.Tensor, scale: float, eos: bool, oov_offset: float = 0.0
    ) -> list[WordScore]:
        """The units' natural-log probabilities ``(len(ids),)`` summed into words, plus
        ``oov_offset`` for an OOV word, times ``scale``; the ``<eos>`` word dropped unless ``eos``."""
        sums = torch.zeros(len(self.words), dtype=torch.float64).index_add_(
            0, torch.tensor(word_index(self.ends), dtype=torch.long), unit_log_probs.double()
        )
        scores = [
            WordScore(w, (float(v) + (oov_offset if oov else 0.0)) * scale, oov)
            for w, v, oov in zip(self.words, sums.tolist(), self.oov)
        ]
        return scores if eos else scores[:-1]
