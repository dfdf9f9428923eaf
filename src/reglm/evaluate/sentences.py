"""Independent sentences scored in batches: each read from a fresh state after one context token.

This is how a sentence or an n-best hypothesis is scored (``reglm score``, ``lm.score_batch``):
every sentence starts from the encoder's zero state with the context token (``<eos>``, the
beginning of a sentence) as its first input, and each of its ids is a target once. Sentences of
any lengths share a batch: the window planner's sentence plan
(:meth:`reglm.data.sentence_plan.SentencePlan.of_sentences`) sorts them by length (longest first, so
the largest batch is met first), packs them into batches of at most ``batch_tokens`` padded
positions and pads them at their ends. Every encoder here is causal (an LSTM reads left to right, the Transformer
attends to the
past only), so the padding after a sentence never changes its scores; the results come back in
the input order, equal to scoring each sentence alone up to float rounding.

A sentence longer than ``window`` tokens is read alone, in windows (:func:`long_log_probs`), so
that no line, however long, makes an unbounded batch: a stateful encoder carries its state from
window to window (the same numbers as one pass); a stateless one (the Transformer) reads each
window's targets after up to ``window // 2`` tokens of the sentence before them, ``window``
being its trained context, so attention never spans more than it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from reglm.data.sentence_plan import SentencePlan
from reglm.data.windows import ContextPlan, StreamPlan
from reglm.evaluate.perplexity import stream_pass


@torch.no_grad()
def sentence_log_probs(
    model: torch.nn.Module,
    sentences: Sequence[Sequence[int]],
    context: int,
    device: torch.device | str = "cpu",
    batch_tokens: int = 4096,
    progress: bool = False,
    window: int | None = None,
) -> list[Tensor]:
    """Natural-log probability of every id of every sentence (float64 ``(len,)`` tensors on the
    CPU, in the input order), each sentence read after ``context`` from a zero state, in the
    batches of :meth:`~reglm.data.sentence_plan.SentencePlan.of_sentences`. ``model`` is a
    :class:`~reglm.models.LanguageModel`; it is put in eval mode and its mode restored. A sentence
    longer than ``window`` (default ``batch_tokens``) is read in windows of that many tokens
    (:func:`long_log_probs`)."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    window = batch_tokens if window is None else window
    scores: list[Tensor] = [torch.zeros(0, dtype=torch.float64) for _ in sentences]
    short = [i for i, s in enumerate(sentences) if 0 < len(s) <= window]
    for i, sentence in enumerate(sentences):
        if len(sentence) > window:
            scores[i] = long_log_probs(model, sentence, context, device, window, max(1, batch_tokens // window))
    if short:
        plan = SentencePlan.of_sentences([sentences[i] for i in short], context, batch_tokens)
        totals = stream_pass(
            [model],
            plan,
            batch_tokens,
            lambda outs, w: {"nll": model.output.nll(outs[0], w.targets)},
            device,
            progress,
            "score",
            keep=("nll",),
        )
        log_probs = -totals.kept["nll"][1].double().cpu()
        for i, part in zip(short, torch.split(log_probs, [len(sentences[i]) for i in short])):
            scores[i] = part
    return scores


def long_log_probs(
    model: torch.nn.Module,
    ids: Sequence[int],
    context: int,
    device: torch.device | str,
    window: int,
    batch_size: int = 1,
) -> Tensor:
    """Natural-log probability of every id of one sentence read after ``context``, in windows of
    ``window`` tokens: a stateful model carries its state from one window to the next, a
    stateless one reads every window's targets after up to ``window // 2`` tokens before them
    (:class:`~reglm.data.windows.ContextPlan`, ``batch_size`` windows at a time). Float64
    ``(len(ids),)`` on the CPU."""
    stream = torch.tensor([context, *ids], dtype=torch.long)
    stateful = model.init_state(1, device=device) is not None
    plan = StreamPlan(stream, 1, "all") if stateful else ContextPlan(stream, window, window // 2, batch_size)
    totals = stream_pass(
        [model],
        plan,
        window,
        lambda outs, w: {"nll": model.output.nll(outs[0], w.targets)},
        device,
        keep=("nll",),
    )
    return -totals.kept["nll"][1].double().cpu()
