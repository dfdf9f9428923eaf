"""Incremental, batched scoring for decoders that extend hypotheses one word at a time.

A beam-search decoder (ASR, keyboard suggestion) holds ``B`` hypotheses and extends each by one
word per step. :class:`Hypotheses` keeps, for every hypothesis, what the model needs to go on:
the encoder's opaque state after its words (an LSTM's or QRNN's; :mod:`reglm.encoders.base`),
and the encoder's output at its last token, from which the next word's distribution comes.

>>> hyps = lm.start(2)                          # doctest: +SKIP  (two hypotheses, sentence start)
>>> hyps.advance(["the", "a"])                  # doctest: +SKIP  log p of each word, (B,) float64
>>> log_p, ids = hyps.top_k(5)                  # doctest: +SKIP  the 5 likeliest next words of each
>>> hyps = hyps.select([0, 0, 1])               # doctest: +SKIP  fork hypothesis 0, keep 1
>>> hyps.advance(["company", "market", "<eos>"])  # doctest: +SKIP

:meth:`Hypotheses.advance` runs one batched forward for all ``B`` hypotheses, and the word's
log-probability is read from the output kept from the step before, so a word costs one step of
the encoder and one target of the output layer (the full distribution only when asked for:
:meth:`Hypotheses.next_log_probs`, :meth:`Hypotheses.top_k`). A sentence advanced word by word,
``<eos>`` last, gets the numbers ``lm.score`` gives it (up to float rounding): the same start
(after ``<eos>``, from the zero state) and the same model.

A sub-word (BPE) model advances by whole words too: each word is segmented into its units, and
its log-probability is the sum of theirs, as :meth:`~reglm.api.TrainedModel.score` sums them.
Hypotheses whose words have different numbers of units are advanced in groups of equal counts.

**Stateless encoders** (the Transformer) carry no state: each hypothesis keeps its token prefix
and every step re-encodes it, so a step costs a forward over the prefix, not over one token. The
prefix is bounded by ``context`` tokens (:meth:`reglm.api.TrainedModel.start`: by default the
``train.block_size`` the model was trained on when its run configuration is known, else
:data:`reglm.api.WINDOW`, 256; ``None`` here: unbounded): past it, the oldest tokens are dropped
and the model reads a sliding window, as it never saw a longer one. Within the bound the numbers
are ``lm.score``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from reglm.data.bpe import BPEVocab
from reglm.data.vocab import UNK, Vocab
from reglm.encoders.base import EncoderOutput, State, concat_states, select_streams
from reglm.errors import ReglmError
from reglm.models import LanguageModel


class ScoringModel(Protocol):
    """What the hypotheses read of :class:`reglm.api.TrainedModel`."""

    model: LanguageModel
    vocab: Vocab
    device: torch.device
    subword: BPEVocab | None

    def tokens_to_ids(self, tokens: list[str]) -> list[int]: ...


def _map(out: EncoderOutput, fn: Callable[[Tensor], Tensor]) -> EncoderOutput:
    """``out`` with ``fn`` applied to its output, raw output and every layer's output (no state)."""
    return EncoderOutput(fn(out.output), fn(out.raw_output), [fn(t) for t in out.layer_outputs], None)


def _cat_rows(outs: Sequence[EncoderOutput]) -> EncoderOutput:
    """Encoder outputs of consecutive groups of rows joined along the batch axis (no state)."""
    return EncoderOutput(
        torch.cat([o.output for o in outs]),
        torch.cat([o.raw_output for o in outs]),
        [torch.cat(layer) for layer in zip(*(o.layer_outputs for o in outs))],
        None,
    )


def _cat_time(a: EncoderOutput, b: EncoderOutput) -> EncoderOutput:
    """``a`` then ``b`` along the time axis (no state)."""
    return EncoderOutput(
        torch.cat([a.output, b.output], 1),
        torch.cat([a.raw_output, b.raw_output], 1),
        [torch.cat(pair, 1) for pair in zip(a.layer_outputs, b.layer_outputs)],
        None,
    )


def _gather_time(out: EncoderOutput, index: Tensor) -> EncoderOutput:
    """The outputs at positions ``index: (B, m)`` of each row: every tensor ``(B, m, D)``."""
    return _map(out, lambda t: t.gather(1, index[:, :, None].expand(-1, -1, t.size(-1))))


class Hypotheses:
    """``B`` hypotheses of a decoder, each a word sequence read from the start of a sentence.

    Made by :meth:`reglm.api.TrainedModel.start`; every method returns new tensors and leaves
    the object as it was, except :meth:`advance`, which extends every hypothesis by one word.
    ``totals: (B,)`` is each hypothesis' summed log-probability (float64, in ``base``).
    """

    def __init__(
        self,
        lm: ScoringModel,
        state: State | None,
        last: EncoderOutput,
        prefixes: list[list[int]] | None,
        totals: Tensor,
        context: int | None,
        scale: float,
        oov_offset: float = 0.0,
    ) -> None:
        self.lm = lm
        self.state = state
        self.last = last
        self.prefixes = prefixes
        self.totals = totals
        self.context = context
        self.scale = scale
        self.oov_offset = oov_offset

    @classmethod
    def start(
        cls, lm: ScoringModel, batch: int, context: int | None, scale: float, oov_offset: float = 0.0
    ) -> Hypotheses:
        """``batch`` empty hypotheses: each has read the ``<eos>`` that opens a sentence.
        ``oov_offset``: the natural-log amount an out-of-vocabulary word (given as a string to a
        word model) gets on top of ``log p(<unk>)``, as ``reglm.evaluate.words.oov_offset`` computes it."""
        if not isinstance(batch, int) or batch < 1:
            raise ReglmError(f"the number of hypotheses must be a positive integer, not {batch!r}")
        if context is not None and (not isinstance(context, int) or context < 1):
            raise ReglmError(f"context={context!r} must be a positive number of tokens")
        model, eos = lm.model, lm.vocab.eos_id
        state = model.init_state(batch, device=lm.device)
        with torch.no_grad():
            out = model(torch.full((batch, 1), eos, dtype=torch.long, device=lm.device), state)
        prefixes = [[eos] for _ in range(batch)] if out.state is None else None
        return cls(
            lm,
            out.state,
            _map(out, lambda t: t),
            prefixes,
            torch.zeros(batch, dtype=torch.float64),
            context,
            scale,
            oov_offset,
        )

    def __len__(self) -> int:
        return self.totals.numel()

    def select(self, index: Sequence[int] | Tensor) -> Hypotheses:
        """The hypotheses ``index`` (a list or 1-D integer tensor of positions, which may repeat
        a hypothesis, to fork it, or leave one out, to drop it), in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        if index.dim() != 1 or index.numel() == 0:
            raise ReglmError("select takes a non-empty list of hypothesis positions")
        if int(index.min()) < 0 or int(index.max()) >= len(self):
            raise ReglmError(f"select: positions must be in [0, {len(self)}) for {len(self)} hypotheses")
        on_device = index.to(self.lm.device)
        prefixes = None if self.prefixes is None else [list(self.prefixes[i]) for i in index.tolist()]
        return Hypotheses(
            self.lm,
            select_streams(self.state, on_device),
            _map(self.last, lambda t: t[on_device]),
            prefixes,
            self.totals[index],
            self.context,
            self.scale,
            self.oov_offset,
        )

    def _units(self, words: Sequence[str] | Tensor) -> list[list[int]]:
        """The unit ids of each hypothesis' next word (one id each for a word model)."""
        if isinstance(words, Tensor):
            if self.lm.subword is not None:
                raise ReglmError("a sub-word (BPE) model advances by words given as strings, not by ids")
            if words.dim() != 1 or words.numel() != len(self) or words.dtype not in (torch.int32, torch.int64):
                raise ReglmError(f"advance takes {len(self)} word ids as a 1-D integer tensor")
            if words.numel() and (int(words.min()) < 0 or int(words.max()) >= len(self.lm.vocab)):
                raise ReglmError(f"word ids must be in [0, {len(self.lm.vocab)})")
            return [[i] for i in words.tolist()]
        if isinstance(words, str) or len(words) != len(self) or not all(isinstance(w, str) for w in words):
            raise ReglmError(f"advance takes one word (a str) per hypothesis: {len(self)} of them")
        if self.lm.subword is not None:
            return [list(units) for units in self.lm.subword.word_units(list(words))]
        return [[i] for i in self.lm.tokens_to_ids(list(words))]

    @torch.no_grad()
    def advance(self, words: Sequence[str] | Tensor) -> Tensor:
        """Extend hypothesis ``b`` by ``words[b]`` (a word, ``<eos>`` to end the sentence, or a
        word id); returns each word's log-probability given its hypothesis, ``(B,)`` float64 on
        the CPU, also added to :attr:`totals`. A word outside the vocabulary is read as ``<unk>``
        and gets the OOV offset of :meth:`reglm.api.TrainedModel.start`'s ``oov_penalty``."""
        units = self._units(words)
        counts = torch.tensor([len(u) for u in units])
        width = int(counts.max())
        device = self.lm.device
        targets = torch.tensor([u + [u[-1]] * (width - len(u)) for u in units], device=device)
        fresh = (
            self._encode_stateless(units)
            if self.prefixes is not None
            else self._encode_stateful(units, counts, targets)
        )
        # the output before unit j predicts unit j: the kept one for the first, the fresh ones after
        ends = counts.to(device)[:, None] - 1
        before = (
            _gather_time(fresh, (torch.arange(width - 1, device=device)[None, :]).clamp(max=ends - 1).clamp(min=0))
            if width > 1
            else None
        )
        predicting = self.last if before is None else _cat_time(self.last, before)
        nll = self.lm.model.output.nll(predicting, targets).double().cpu()
        mask = torch.arange(width)[None, :] < counts[:, None]
        log_p = (-(nll * mask).sum(1) + self._oov_offsets(words)) * self.scale
        self.last = _gather_time(fresh, ends)
        self.totals = self.totals + log_p
        return log_p

    def _oov_offsets(self, words: Sequence[str] | Tensor) -> Tensor:
        """``(B,)``: the OOV offset for each word outside a word model's vocabulary, else 0."""
        if isinstance(words, Tensor) or self.lm.subword is not None or not self.oov_offset:
            return torch.zeros(len(self), dtype=torch.float64)
        return torch.tensor([self.oov_offset if w not in self.lm.vocab else 0.0 for w in words], dtype=torch.float64)

    def _encode_stateful(self, units: list[list[int]], counts: Tensor, targets: Tensor) -> EncoderOutput:
        """Run the encoder over each hypothesis' new units from its state, in groups of equal
        unit counts; the state moves on. Returns the fresh outputs ``(B, width, ...)``, padded."""
        model, device = self.lm.model, self.lm.device
        groups = [torch.nonzero(counts == n).flatten() for n in torch.unique(counts).tolist()]
        width = targets.size(1)
        outs, states = [], []
        for rows in groups:
            on_device = rows.to(device)
            n = len(units[int(rows[0])])
            state = self.state if len(groups) == 1 else select_streams(self.state, on_device)
            out = model(targets[on_device, :n], state)
            states.append(out.state)
            pad = width - n
            outs.append(_map(out, lambda t: torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t))
        if len(groups) == 1:
            self.state = states[0]
            return outs[0]
        back = torch.argsort(torch.cat(groups)).to(device)
        self.state = select_streams(concat_states(states), back)
        return _map(_cat_rows(outs), lambda t: t[back])

    def _encode_stateless(self, units: list[list[int]]) -> EncoderOutput:
        """Re-encode each hypothesis' prefix with its new units (the last :attr:`context` tokens),
        right-padded into one batch. Returns the outputs at the new units ``(B, width, ...)``."""
        assert self.prefixes is not None
        model, device = self.lm.model, self.lm.device
        for prefix, new in zip(self.prefixes, units):
            prefix.extend(new)
            if self.context is not None and len(prefix) > self.context:
                del prefix[: len(prefix) - self.context]
        lengths = torch.tensor([len(p) for p in self.prefixes])
        ids = torch.full((len(self), int(lengths.max())), self.lm.vocab.eos_id, dtype=torch.long)
        for row, prefix in enumerate(self.prefixes):
            ids[row, : len(prefix)] = torch.tensor(prefix)
        out = model(ids.to(device), None)
        width = max(len(u) for u in units)
        counts = torch.tensor([len(u) for u in units])
        index = (lengths - counts)[:, None] + torch.arange(width)[None, :]
        return _gather_time(out, index.clamp(min=0).clamp(max=lengths[:, None] - 1).to(device))

    @torch.no_grad()
    def next_log_probs(self) -> Tensor:
        """Every word's log-probability as each hypothesis' next word, ``(B, V)`` (in ``base``)."""
        if self.lm.subword is not None:
            raise ReglmError(
                "a sub-word (BPE) model's next token is a unit, not a word; next-word lists need a word-level model"
            )
        return self.lm.model.output.predict(self.last)[:, 0].double() * self.scale

    def top_k(self, k: int, exclude: Sequence[str] = (UNK,)) -> tuple[Tensor, Tensor]:
        """``(log_probs, ids)``, both ``(B, k)``: each hypothesis' ``k`` likeliest next words,
        likeliest first (``lm.vocab.itos`` names them); the words of ``exclude`` are never proposed
        (by default ``<unk>``; ``<eos>`` is: the sentence may end)."""
        if not isinstance(k, int) or k < 1:
            raise ReglmError(f"k={k!r} must be a positive integer")
        log_p = self.next_log_probs()
        for word in exclude:
            if word in self.lm.vocab:
                log_p[:, self.lm.vocab.stoi[word]] = -torch.inf
        values, ids = torch.topk(log_p, min(k, log_p.size(1) - sum(w in self.lm.vocab for w in set(exclude))), dim=1)
        return values.cpu(), ids.cpu()
