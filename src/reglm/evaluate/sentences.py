"""Independent sentences scored in batches: each read from a fresh state after one context token.

This is how a sentence or an n-best hypothesis is scored (``reglm score``, ``lm.score_batch``):
every sentence starts from the encoder's zero state with the context token (``<eos>``, the
beginning of a sentence) as its first input, and each of its ids is a target once. Sentences of
any lengths share a batch: they are sorted by length (longest first, so the largest batch is met
first), packed into batches of at most ``batch_tokens`` padded positions and padded at their
ends. Every encoder here is causal (an LSTM reads left to right, the Transformer attends to the
past only), so the padding after a sentence never changes its scores; the results come back in
the input order, equal to scoring each sentence alone up to float rounding.

A sentence longer than ``window`` tokens is read alone, in windows (:func:`long_log_probs`), so
that no line, however long, makes an unbounded batch: a stateful encoder carries its state from
window to window (the same numbers as one pass); a stateless one (the Transformer) reads each
window's targets after up to ``window // 2`` tokens of the sentence before them, ``window``
being its trained context, so attention never spans more than it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from reglm.data.windows import ContextPlan, StreamPlan
from reglm.evaluate.perplexity import stream_pass
from reglm.progress import track


def length_batches(lengths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices of the non-empty sentences, longest first, in groups of at most ``batch_tokens``
    padded positions (a sentence longer than that forms a batch of its own)."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) + 1) * lengths[batch[0]] > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


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
    CPU, in the input order), each sentence read after ``context`` from a zero state. ``model``
    is a :class:`~reglm.models.LanguageModel`; it is put in eval mode and its mode restored. A
    sentence longer than ``window`` (default ``batch_tokens``) is read in windows of that many
    tokens (:func:`long_log_probs`)."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    window = batch_tokens if window is None else window
    lengths = [len(s) for s in sentences]
    scores: list[Tensor] = [torch.zeros(0, dtype=torch.float64) for _ in sentences]
    for i, n in enumerate(lengths):
        if n > window:
            scores[i] = long_log_probs(model, sentences[i], context, device, window, max(1, batch_tokens // window))
            lengths[i] = 0
    batches = list(length_batches(lengths, batch_tokens))
    mode = model.training
    model.eval()
    try:
        for batch in track(batches, len(batches), "score", "batch", progress):
            width = lengths[batch[0]]
            targets = torch.full((len(batch), width), context, dtype=torch.long)
            for row, i in enumerate(batch):
                targets[row, : lengths[i]] = torch.as_tensor(sentences[i], dtype=torch.long)
            inputs = torch.cat([torch.full((len(batch), 1), context, dtype=torch.long), targets[:, :-1]], dim=1)
            inputs, targets = inputs.to(device), targets.to(device)
            out = model(inputs, model.init_state(len(batch), device=device))
            logp = (-model.output_nll(out, targets)).double().cpu()
            for row, i in enumerate(batch):
                scores[i] = logp[row, : lengths[i]].clone()
    finally:
        model.train(mode)
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
        lambda outs, w: {"nll": model.output_nll(outs[0], w.targets)},
        device,
        keep=("nll",),
    )
    return -totals.kept["nll"][1].double().cpu()
