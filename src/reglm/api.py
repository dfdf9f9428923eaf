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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch

from reglm.data.bpe import BPEVocab
from reglm.data.vocab import EOS, UNK, Vocab
from reglm.data.windows import StreamPlan
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import perplexity, stream_pass
from reglm.models import LanguageModel
from reglm.rundir import model_dir, require_kind
from reglm.train.checkpoint import load_model_dir

WINDOW = 256


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
                raise ReglmError(f"the word {tok!r} is not in the model's vocabulary ({len(self.vocab)} words, no <unk>); use only known words")
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
        totals = stream_pass([self.model], StreamPlan(stream, 1, "all"), WINDOW, lambda outs, w: {"nll": self.model.output_nll(outs[0], w.targets)}, self.device, keep=("nll",))
        return -totals.kept["nll"][1].double()

    def score(self, sentence: str) -> float:
        """Total log-probability (natural log) of one sentence, its final ``<eos>`` included."""
        return float(self.target_log_probs(self.tokens_to_ids(sentence.split()) + [self.vocab.eos_id]).sum())

    def perplexity(self, text: str) -> float:
        """exp(mean NLL) over every token of ``text`` (one ``<eos>`` per line); for a BPE model
        word-level: exp(summed unit NLL / words of ``text``, ``<eos>`` included)."""
        if self.subword is None:
            logp = self.target_log_probs(self.text_to_ids(text))
            return perplexity(-float(logp.mean()))
        ids, ends = self.text_to_units(text)
        logp = self.target_log_probs(ids)
        return perplexity(-float(logp.sum()) / max(sum(ends), 1))

    def generate(self, words: int, temperature: float = 1.0, seed: int = 0, prompt: str = "") -> list[str]:
        """Sample ``words`` tokens after ``prompt``; returns the prompt's tokens and the sampled ones."""
        return list(self.stream(words, temperature, seed, prompt))

    @torch.no_grad()
    def stream(self, words: int, temperature: float = 1.0, seed: int = 0, prompt: str = "") -> Iterator[str]:
        """:meth:`generate` as it goes: yields the prompt's tokens, then each sampled token as soon
        as it is drawn (no limit on ``words``; memory stays constant).

        Sampling draws from ``softmax(log p / temperature)``, computed in float64 from the most
        likely word's log-probability, so a temperature small enough to underflow any other
        word's weight samples the most likely word (greedy decoding) instead of failing.
        For a BPE model the tokens are units (the prompt's words segmented; ``</w>`` ends a word,
        :meth:`reglm.data.bpe.BPEVocab.join` re-joins them).
        """
        if words < 0:
            raise ReglmError(f"--words {words} must be >= 0")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ReglmError(f"--temperature {temperature} must be a positive number")
        if not 0 <= seed < 2**63:
            raise ReglmError(f"--seed {seed} must be in [0, 2^63)")
        prompt_tokens = prompt.split()
        if self.subword is not None:
            prompt_tokens = self.subword.decode(self.tokens_to_ids(prompt_tokens))
        unknown = [t for t in prompt_tokens if t not in self.vocab]
        if unknown:
            hint = f"rephrase the prompt or write {UNK}" if self.vocab.unk_id is not None else "rephrase the prompt with words of the vocabulary (vocab.txt of the run)"
            raise ReglmError(f"prompt word(s) {', '.join(repr(t) for t in unknown[:5])} are not in the model's vocabulary; {hint}")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        ids = [self.vocab.eos_id, *(self.vocab.stoi[t] for t in prompt_tokens)]
        state = self.model.init_state(1, device=self.device)
        result = self.model(torch.tensor([ids], device=self.device), state)
        yield from prompt_tokens
        for _ in range(words):
            log_p = self.model.output_log_probs(result)[0, -1].double().cpu()
            scaled = (log_p - log_p.max()) / temperature
            nxt = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen))
            yield self.vocab.itos[nxt]
            result = self.model(torch.tensor([[nxt]], device=self.device), result.state)


def load(path: Path | str, which: str = "best", device: str | torch.device = "cpu") -> TrainedModel:
    """Load the ``best`` (or ``last``) model of a run directory, or a model directory itself."""
    directory = model_dir(path, which)
    model, config, vocab = load_model_dir(directory, device)
    require_kind(config.objective.kind, directory, "lm")
    return TrainedModel(model, vocab, torch.device(device))


def _lines(text: str) -> list[str]:
    """The lines of ``text``; a final newline ends the last line rather than starting an empty one."""
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    return lines


def render(tokens: list[str]) -> str:
    """Tokens as text: ``<eos>`` ends a line."""
    lines, current = [], []
    for tok in tokens:
        if tok == EOS:
            lines.append(" ".join(current))
            current = []
        else:
            current.append(tok)
    lines.append(" ".join(current))
    return "\n".join(lines)
