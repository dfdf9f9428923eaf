"""The Python API: ``reglm.load(run_dir)`` gives a trained model that scores and generates text.

>>> lm = reglm.load("runs/ptb")                       # doctest: +SKIP
>>> lm.score("the company said")                      # doctest: +SKIP  (natural log, <eos> scored)
>>> lm.perplexity(open("valid.txt").read())           # doctest: +SKIP

Text follows the corpus rule: each line is split on whitespace and ends with ``<eos>``. Scoring
starts from the state after an ``<eos>``, i.e. at the beginning of a sentence.

A BPE model (``data.tokenizer=bpe``, its model directory holds ``tokenizer.json``) segments every
word into its units first; :meth:`TrainedModel.score` then sums the units' log-probabilities and
:meth:`TrainedModel.perplexity` is word-level, ``exp(-sum log p / words)`` with ``<eos>`` a word
(the probability of a word is the product of its units', Baevski & Auli 2019, 4.4).

An out-of-vocabulary word is scored under ``oov_penalty`` (``reglm score --oov-penalty``):
:mod:`reglm.evaluate.words` says how.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from reglm.data.bpe import BPEVocab
from reglm.data.vocab import EOS, UNK, Vocab
from reglm.data.windows import StreamPlan
from reglm.errors import ReglmError
from reglm.evaluate.incremental import Hypotheses
from reglm.evaluate.perplexity import EvalResult, perplexity_of, stream_pass
from reglm.evaluate.sentences import sentence_log_probs
from reglm.evaluate.text_modes import evaluate_text
from reglm.evaluate.words import OOV_SHARE, SentenceUnits, WordScore, log_scale, oov_offset, word_index
from reglm.hub import pretrained_directory, push_to_hub, save_pretrained
from reglm.modeldir import load_model_dir
from reglm.models import LanguageModel
from reglm.rundir import model_dir, require_kind

WINDOW = 256
"""Tokens per window when a text is read as one stream (:meth:`TrainedModel.target_log_probs`)."""
BATCH_LOGITS = 1 << 25
"""Padded positions times vocabulary size per batch of sentences (128 MiB of float32 logits)."""


class TrainedModel:
    """A trained language model with its vocabulary, in eval mode (``subword``: the BPE vocabulary
    with its tokenizer for a sub-word model, else ``None``)."""

    def __init__(self, model: LanguageModel, vocab: Vocab, device: torch.device):
        self.model = model.eval()
        self.vocab = vocab
        self.device = device
        self.subword: BPEVocab | None = vocab if isinstance(vocab, BPEVocab) else None

    def tokens_to_ids(self, tokens: list[str]) -> list[int]:
        """Ids of ``tokens``; unknown words become ``<unk>`` when the vocabulary has it. A BPE
        model gives the units of each word in turn (never unknown: an unseen character is ``<unk>``)."""
        if self.subword is not None:
            return self.subword.encode_words(tokens)[0]
        ids = []
        for tok in tokens:
            if tok in self.vocab:
                ids.append(self.vocab.stoi[tok])
            elif self.vocab.unk_id is not None:
                ids.append(self.vocab.unk_id)
            else:
                raise ReglmError(
                    f"the word {tok!r} is not in the model's vocabulary ({len(self.vocab)} words, no <unk>); use "
                    "only known words"
                )
        return ids

    def text_to_ids(self, text: str) -> list[int]:
        """Ids of ``text`` by the corpus rule: one ``<eos>`` after every line (a final newline ends the last)."""
        ids: list[int] = []
        for line in _lines(text):
            ids.extend(self.tokens_to_ids(line.split()))
            ids.append(self.vocab.eos_id)
        return ids

    def text_to_units(self, text: str) -> tuple[list[int], list[bool]]:
        """``(ids, word_ends)`` of ``text``: :meth:`text_to_ids` and, per id, whether it closes a
        word (every id of a word model; the last unit of each word, and ``<eos>``, for BPE)."""
        if self.subword is None:
            ids = self.text_to_ids(text)
            return ids, [True] * len(ids)
        words: list[str] = []
        for line in _lines(text):
            words.extend(line.split())
            words.append(EOS)
        return self.subword.encode_words(words)

    def target_log_probs(self, ids: list[int]) -> torch.Tensor:
        """Natural-log probability of each id given the ones before it, starting after ``<eos>``."""
        stream = torch.tensor([self.vocab.eos_id, *ids], dtype=torch.long)
        totals = stream_pass(
            [self.model],
            StreamPlan(stream, 1, "all"),
            WINDOW,
            lambda outs, w: {"nll": self.model.output.nll(outs[0], w.targets)},
            self.device,
            keep=("nll",),
        )
        return -totals.kept["nll"][1].double()

    def score(
        self, sentence: str, base: str | int = "e", eos: bool = True, oov_penalty: str | float | None = OOV_SHARE
    ) -> float:
        """Total log-probability of one sentence read after ``<eos>``, its final ``<eos>`` scored
        unless ``eos`` is false; natural log, or log10 with ``base=10``. A word outside the
        vocabulary is scored as ``<unk>`` with ``oov_penalty`` applied (see the module doc;
        :meth:`full_scores` flags it)."""
        if not isinstance(sentence, str):
            raise ReglmError(
                f"score takes one sentence as a str, not {type(sentence).__name__}; for several sentences use "
                "score_batch"
            )
        return self.score_batch([sentence], base, eos, oov_penalty=oov_penalty)[0]

    def score_batch(
        self,
        sentences: Sequence[str],
        base: str | int = "e",
        eos: bool = True,
        carry: bool = False,
        progress: bool = False,
        oov_penalty: str | float | None = OOV_SHARE,
    ) -> list[float]:
        """:meth:`score` of every sentence, computed in padded batches sorted by length (the same
        numbers as one at a time, up to float rounding). With ``carry`` the sentences are read
        as one text, each from the state the previous one left (a document, not an n-best list)."""
        scored = self.full_scores_batch(sentences, base, eos, carry, progress, oov_penalty)
        return [sum(w.log_prob for w in words) for words in scored]

    def full_scores(
        self, sentence: str, base: str | int = "e", eos: bool = True, oov_penalty: str | float | None = OOV_SHARE
    ) -> list[WordScore]:
        """Per word of ``sentence`` (and its ``<eos>`` unless ``eos`` is false): the word, its
        log-probability given the words before it, and whether it is out of the vocabulary (like
        KenLM's ``full_scores``; an OOV word's score follows ``oov_penalty``, see the module doc).
        A sub-word model's word is the product of its units."""
        if not isinstance(sentence, str):
            raise ReglmError(
                f"full_scores takes one sentence as a str, not {type(sentence).__name__}; for several sentences "
                "use full_scores_batch"
            )
        return self.full_scores_batch([sentence], base, eos, oov_penalty=oov_penalty)[0]

    def full_scores_batch(
        self,
        sentences: Sequence[str],
        base: str | int = "e",
        eos: bool = True,
        carry: bool = False,
        progress: bool = False,
        oov_penalty: str | float | None = OOV_SHARE,
    ) -> list[list[WordScore]]:
        """:meth:`full_scores` of every sentence (batched as in :meth:`score_batch`)."""
        if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
            raise ReglmError("expected a list of sentences, each a str; for one sentence use score or full_scores")
        scale = log_scale(base)
        offset = oov_offset(self.vocab, oov_penalty, base)
        encoded = [self._encode_sentence(s) for s in sentences]
        if carry:
            stream = [i for units in encoded for i in units.ids]
            flat = self.target_log_probs(stream) if stream else torch.zeros(0, dtype=torch.float64)
            unit_scores = list(torch.split(flat, [len(units.ids) for units in encoded]))
        else:
            batch_tokens = max(256, BATCH_LOGITS // len(self.vocab))
            ids = [units.ids for units in encoded]
            window = self._window(batch_tokens)
            unit_scores = sentence_log_probs(
                self.model, ids, self.vocab.eos_id, self.device, batch_tokens, progress, window
            )
        return [units.word_scores(logp, scale, eos, offset) for units, logp in zip(encoded, unit_scores)]

    def next_words(
        self, prefix: str = "", k: int = 10, base: str | int = "e", exclude: Sequence[str] = (UNK,)
    ) -> list[tuple[str, float]]:
        """The ``k`` most likely next words after ``prefix`` (read from the start of a sentence),
        most likely first, with their log-probabilities; the words of ``exclude`` are never
        proposed (by default ``<unk>``; ``<eos>`` is proposed: the sentence may end)."""
        if not isinstance(prefix, str):
            raise ReglmError(f"next_words takes the prefix as a str, not {type(prefix).__name__}")
        if self.subword is not None:
            raise ReglmError(
                "next_words proposes whole words; this is a sub-word (BPE) model, whose next token is a unit: use "
                "generate, or a word-level model"
            )
        if not isinstance(k, int) or k < 1:
            raise ReglmError(f"k={k!r} must be a positive integer")
        scale = log_scale(base)
        tokens = prefix.split()
        self._require_known(tokens, "prefix")
        ids = torch.tensor([[self.vocab.eos_id, *(self.vocab.stoi[t] for t in tokens)]], device=self.device)
        with torch.no_grad():
            log_p = self.model.log_probs(ids, self.model.init_state(1, device=self.device))[0][0, -1].double().cpu()
        for word in exclude:
            if word in self.vocab:
                log_p[self.vocab.stoi[word]] = -math.inf
        values, order = torch.topk(log_p, min(k, int(torch.isfinite(log_p).sum())))
        return [(self.vocab.itos[i], v * scale) for i, v in zip(order.tolist(), values.tolist())]

    def start(
        self,
        batch: int = 1,
        base: str | int = "e",
        context: int | None = None,
        oov_penalty: str | float | None = OOV_SHARE,
    ) -> Hypotheses:
        """``batch`` hypotheses at the start of a sentence, for a decoder to extend one word at a
        time in batched steps, fork and drop (:class:`~reglm.evaluate.incremental.Hypotheses`).
        ``context`` bounds the tokens a stateless model (the Transformer) re-reads per step; by
        default the context it was trained on, or :data:`WINDOW` when unknown. An OOV word is
        scored under ``oov_penalty`` as by :meth:`score`."""
        if context is None:
            context = self._trained_context()
        return Hypotheses.start(self, batch, context, log_scale(base), oov_offset(self.vocab, oov_penalty, base))

    def _window(self, batch_tokens: int) -> int:
        """The longest sentence scored in one piece: ``batch_tokens`` for a stateful model (longer
        ones carry the state across windows, exactly); a stateless model's trained context
        (:func:`~reglm.data.batchings.trained_context`; :data:`WINDOW` without a run config)."""
        if self.model.init_state(1, device=self.device) is not None:
            return batch_tokens
        return self._trained_context()

    def _trained_context(self) -> int:
        if self.run_config is None:
            return WINDOW
        from reglm.data.batchings import trained_context

        return trained_context(self.run_config.train.batching)

    def _encode_sentence(self, sentence: str) -> SentenceUnits:
        """The ids of one sentence's words and its ``<eos>``, which of them close a word, and
        which words are out of the vocabulary."""
        words = [*sentence.split(), EOS]
        if self.subword is not None:
            ids, ends = self.subword.encode_words(words)
            unk = self.vocab.unk_id
            word_ids, unit_oov = word_index(ends), [i == unk for i in ids]
            oov = [False] * len(words)
            for w, flag in zip(word_ids, unit_oov):
                oov[w] = oov[w] or flag
            return SentenceUnits(words, ids, ends, oov)
        return SentenceUnits(
            words, self.tokens_to_ids(words), [True] * len(words), [w not in self.vocab for w in words]
        )

    def _require_known(self, tokens: list[str], what: str) -> None:
        unknown = [t for t in tokens if t not in self.vocab]
        if unknown:
            hint = (
                f"rephrase the {what} or write {UNK}"
                if self.vocab.unk_id is not None
                else f"rephrase the {what} with words of the vocabulary (vocab.txt of the run)"
            )
            raise ReglmError(
                f"{what} word(s) {', '.join(repr(t) for t in unknown[:5])} are not in the model's vocabulary; {hint}"
            )

    def perplexity(self, text: str) -> float:
        """exp(mean NLL) over every token of ``text`` (one ``<eos>`` per line), read in one stream
        after an ``<eos>`` (the first token is scored, as in a sentence); for a BPE model
        word-level: exp(summed unit NLL / words of ``text``, ``<eos>`` included). ``reglm eval``
        follows the papers instead: the first token is context only (N - 1 targets), read in the
        run's test batch of streams, so its number differs slightly on the same text (the
        README's "One text, three numbers"). An OOV word gets the raw ``log p(<unk>)``."""
        if self.subword is None:
            logp = self.target_log_probs(self.text_to_ids(text))
            return perplexity_of(-float(logp.sum()), logp.numel())
        ids, ends = self.text_to_units(text)
        logp = self.target_log_probs(ids)
        return perplexity_of(-float(logp.sum()), max(sum(ends), 1))

    def evaluate(
        self,
        text: str,
        mode: str = "plain",
        spec: str | None = None,
        valid: str | None = None,
        train: str | None = None,
    ) -> EvalResult:
        """``text`` (one ``<eos>`` per line) scored as ``reglm eval`` scores a test split with
        evaluation ``mode`` (a name of :data:`reglm.evaluate.modes.MODES`) and its ``spec`` (the
        text of its flag): the first token is context only, read as the run reads its test split.
        A search tunes on the text ``valid``; dynamic evaluation's ``rms`` rule takes its gradient
        statistics on the text ``train`` (:func:`~reglm.evaluate.text_modes.evaluate_text`)."""
        return evaluate_text(self, text, mode, spec, valid, train)

    def generate(
        self,
        words: int,
        temperature: float = 1.0,
        seed: int = 0,
        prompt: str = "",
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> list[str]:
        """Sample ``words`` tokens after ``prompt``; returns the prompt's tokens and the sampled ones."""
        return list(self.stream(words, temperature, seed, prompt, top_k, top_p))

    @torch.no_grad()
    def stream(
        self,
        words: int,
        temperature: float = 1.0,
        seed: int = 0,
        prompt: str = "",
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Iterator[str]:
        """:meth:`generate` as it goes: yields the prompt's tokens, then each sampled token as soon
        as it is drawn (no limit on ``words``; memory stays constant).

        Sampling draws from ``softmax(log p / temperature)``, computed in float64 from the most
        likely word's log-probability, so a temperature small enough to underflow any other
        word's weight samples the most likely word (greedy decoding) instead of failing.
        ``top_k`` keeps the ``k`` most likely words, ``top_p`` the smallest set of most likely words
        whose probabilities (at this temperature) sum to at least ``p`` (nucleus sampling,
        Holtzman et al. 2020); both may be given, the top-k cut coming first.
        For a BPE model the tokens are units (the prompt's words segmented; ``</w>`` ends a word,
        :meth:`reglm.data.bpe.BPEVocab.join` re-joins them).
        """
        if words < 0:
            raise ReglmError(f"--words {words} must be >= 0")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ReglmError(f"--temperature {temperature} must be a positive number")
        if top_k is not None and top_k < 1:
            raise ReglmError(f"--top-k {top_k} must be >= 1")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ReglmError(f"--top-p {top_p} must be in (0, 1]")
        if not 0 <= seed < 2**63:
            raise ReglmError(f"--seed {seed} must be in [0, 2^63)")
        prompt_tokens = prompt.split()
        if self.subword is not None:
            prompt_tokens = self.subword.decode(self.tokens_to_ids(prompt_tokens))
        self._require_known(prompt_tokens, "prompt")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = [self.vocab.eos_id, *(self.vocab.stoi[t] for t in prompt_tokens)]
        state = self.model.init_state(1, device=self.device)
        result = self.model(torch.tensor([ids], device=self.device), state)
        yield from prompt_tokens
        for _ in range(words):
            log_p = self.model.output.predict(result)[0, -1].double().cpu()
            probs = truncated(torch.softmax((log_p - log_p.max()) / temperature, -1), top_k, top_p)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            yield self.vocab.itos[nxt]
            result = self.model(torch.tensor([[nxt]], device=self.device), result.state)

    run_config = None
    """The :class:`~reglm.config.RunConfig` of the directory the model came from, when
    :func:`load` or :func:`reglm.from_pretrained` loaded it (:meth:`save_pretrained` writes it
    back); else None."""

    def save_pretrained(self, path: Path | str, overwrite: bool = False) -> Path:
        """Write the model as a Hugging Face-style pretrained directory (``config.json``,
        ``model.safetensors``, ``vocab.txt``, and ``tokenizer.json`` for BPE), which
        :func:`reglm.from_pretrained` and :func:`load` read back (:func:`reglm.hub.save_pretrained`);
        a directory that already holds a model is replaced only with ``overwrite``."""
        return save_pretrained(self, path, overwrite)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload reglm model",
    ) -> str:
        """Upload :meth:`save_pretrained`'s directory to a Hugging Face Hub repository (the ``hub``
        extra); returns the commit's URL (:func:`reglm.hub.push_to_hub`)."""
        return push_to_hub(self, repo_id, private, token, commit_message)


def load(path: Path | str, which: str = "best", device: str | torch.device = "cpu") -> TrainedModel:
    """Load the ``best`` (or ``last``) model of a run directory, or a model directory itself."""
    directory = model_dir(path, which)
    model, config, vocab = load_model_dir(directory, device)
    require_kind(config.objective.kind, directory, "lm")
    lm = TrainedModel(model, vocab, torch.device(device))
    lm.run_config = config
    return lm


def from_pretrained(
    path_or_repo_id: Path | str,
    which: str = "best",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    token: str | None = None,
) -> TrainedModel:
    """A :class:`TrainedModel` from a local run directory (its ``which`` model), a model directory,
    or a Hugging Face Hub repository holding a model directory (``revision``: a branch, tag or
    commit; ``token``: for a private repository; :func:`reglm.hub.pretrained_directory`). It keeps
    its run configuration (``run_config``), which :meth:`TrainedModel.save_pretrained` writes back."""
    return load(pretrained_directory(path_or_repo_id, which, revision, token), which, device)


def truncated(probs: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """``probs: (V,)`` with every word outside the top ``top_k`` and outside the nucleus of mass
    ``top_p`` set to zero (the most likely word always stays; ties at the cut keep the lower id)."""
    if top_k is None and top_p is None:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_k is not None:
        keep[top_k:] = False
    if top_p is not None:
        mass_before = torch.cumsum(sorted_probs * keep, 0) - sorted_probs
        keep &= mass_before < top_p * float((sorted_probs * keep).sum())
    keep[0] = True
    return torch.zeros_like(probs).index_put_((order[keep],), sorted_probs[keep])


def _lines(text: str) -> list[str]:
    """The lines of ``text``; a final newline ends the last line rather than starting an empty one."""
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines
