"""Per-batch schedules of the training loop: variable BPTT length and the matching learning rate.

AWD-LSTM section 4.1 (Merity et al., 2017): a fixed BPTT window always cuts the stream at the
same positions, so every token at a multiple of the window gets no recurrent gradient at all.
Each batch therefore draws its own length in two steps:

1. the base length is ``bptt`` with probability ``p`` and ``bptt / 2`` with probability ``1 - p``;
2. the length is drawn from ``N(base, std)`` and rounded to an integer,

and the learning rate of that batch is rescaled linearly by ``seq_len / bptt`` so that short
batches do not weigh as much as full ones (the paper's linear scaling rule).

All randomness comes from an explicit CPU :class:`torch.Generator`; the loop saves its state in
every checkpoint, so a resumed run draws exactly the lengths the uninterrupted run would have.
"""

from __future__ import annotations

import math

import torch


def sample_bptt(
    generator: torch.Generator,
    bptt: int,
    p: float = 0.95,
    std: float = 5.0,
    min_len: int = 5,
    max_len: int | None = None,
) -> int:
    """Draw one BPTT length (AWD-LSTM 4.1): ``round(N(base, std))`` with ``base = bptt`` w.p. ``p``, else ``bptt / 2``.

    Exactly two numbers are drawn from ``generator`` (a CPU generator) per call, whatever
    ``p`` and ``std`` are: one uniform for the choice of base, one standard normal for the jitter.

    Rounding: the normal sample is rounded to the *nearest* integer (halves up), so the
    full-length component has mean ``bptt``. The reference AWD-LSTM code truncates with
    ``int()`` instead, which shifts every length down by 0.5 on average.

    The result is clipped to ``[min_len, max_len]`` (``max_len=None``: no upper bound; the
    reference code uses ``min_len=5`` and, against rare out-of-memory lengths, ``max_len=bptt+10``).
    ``max_len`` must be ``>= min_len``.
    """
    use_full = torch.rand((), generator=generator).item() < p
    noise = torch.randn((), generator=generator).item()
    base = bptt if use_full else bptt / 2
    length = max(min_len, math.floor(base + std * noise + 0.5))
    if max_len is not None:
        length = min(max_len, length)
    return length


def scaled_lr(lr: float, seq_len: int, bptt: int) -> float:
    """The learning rate for a batch of ``seq_len`` steps: ``lr * seq_len / bptt`` (AWD-LSTM 4.1)."""
    return lr * seq_len / bptt


def annealed_std(std: float, schedule: str, epoch: int, length: float) -> float:
    """The input-noise std of a main-stage epoch (0-based ``epoch``), Wang et al. 2019 section 5.

    The paper only says "small annealed Gaussian noise"; the schedule is ours to choose:

    * ``constant``: ``std`` every epoch (the authors' code, which then uses no noise in
      fine-tuning -- the trainer's ``finetune_input_noise_std``);
    * ``linear``: ``std * max(0, 1 - epoch / length)``, zero from epoch ``length`` on;
    * ``exponential``: ``std * 0.5 ** (epoch / length)``, halving every ``length`` epochs.
    """
    if schedule == "constant":
        return std
    if schedule == "linear":
        return std * max(0.0, 1.0 - epoch / length)
    if schedule == "exponential":
        return std * 0.5 ** (epoch / length)
    raise ValueError(f"unknown noise schedule {schedule!r}")
