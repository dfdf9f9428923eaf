"""Deterministic evaluation: one full pass, summed token NLL over token count.

The id stream is cut into ``batch_size`` contiguous streams (the trailing ``N mod B`` tokens
are dropped, as in the papers' code), read in windows of ``bptt`` tokens with the hidden state
carried from window to window. Perplexity is ``exp(sum NLL / number of targets)``; nothing is
sampled or averaged per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from reglm.data.batching import batchify, get_batch
from reglm.encoders.awd_lstm import detach_state


def perplexity(loss: float) -> float:
    """``exp(loss)``, or ``inf`` where that overflows (a NaN loss gives NaN): never raises."""
    return math.exp(loss) if loss < 709.0 else (math.inf if loss == loss else math.nan)


@dataclass
class EvalResult:
    loss: float
    """mean NLL per target token (nats)"""
    tokens: int
    """number of scored targets"""
    token_nll: torch.Tensor | None = None
    """(B, L-1) NLL of every target, when asked for"""
    positions: torch.Tensor | None = None
    """(B, L-1) index of each target in the original 1-D stream"""

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": self.loss, "ppl": self.ppl, "tokens": self.tokens}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    ids: torch.Tensor,
    batch_size: int,
    bptt: int,
    device: torch.device | str = "cpu",
    keep_token_nll: bool = False,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Score ``ids`` (N,) with ``model`` in eval mode; returns the exact corpus-level NLL.

    The model is put in eval mode for the pass and its previous mode restored afterwards.
    """
    was_training = model.training
    model.eval()
    data = batchify(ids, batch_size).to(device)
    length = data.size(1)
    state = model.init_state(data.size(0), device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    pieces = []
    starts = range(0, length - 1, bptt)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        x, y = get_batch(data, start, bptt)
        out = model(x, state)
        nll = model.output_nll(out, y)
        state = detach_state(out.state)
        total += nll.sum(dtype=torch.float64)
        count += y.numel()
        if keep_token_nll:
            pieces.append(nll.float().cpu())
    model.train(was_training)
    result = EvalResult(loss=float(total) / max(count, 1), tokens=count)
    if keep_token_nll:
        result.token_nll = torch.cat(pieces, dim=1)
        result.positions = target_positions(data.size(0), length)
    return result


def target_positions(batch_size: int, length: int) -> torch.Tensor:
    """``(B, L-1)``: the index in the original 1-D stream of every target of the ``(B, L)`` rows
    :func:`batchify` cuts (row ``b``, column ``j >= 1`` is stream position ``b * L + j``)."""
    return torch.arange(batch_size).unsqueeze(1) * length + torch.arange(1, length).unsqueeze(0)
