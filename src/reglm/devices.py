"""The device a command runs on, and whether a model fits in its memory.

The model's size is counted on the meta device (nothing allocated) and compared with the
device's memory, so an absurd ``model.encoder.hidden_size`` is a clear error instead of an
allocation of hundreds of gigabytes (when training, and when loading a model directory).
"""

from __future__ import annotations

import os

import torch

from reglm.config import RunConfig
from reglm.errors import ReglmError
from reglm.models import count_parameters

TRAINING_BYTES_PER_PARAMETER = 24
"""What training holds per parameter, roughly: the weights, their gradient, the evaluation copy,
the optimizer's state and the float64 average (4 + 4 + 4 + 4 + 8 bytes)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ReglmError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (the machine's RAM for the CPU), or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_size(
    config: RunConfig,
    vocab_size: int,
    device: torch.device,
    per_parameter: int = TRAINING_BYTES_PER_PARAMETER,
    purpose: str = "training",
    fix: str = "lower model.encoder.hidden_size, model.input.emb_size or model.encoder.num_layers (or data.max_vocab)",
) -> int:
    """The model's parameter count, counted without allocating anything; a model whose
    ``purpose`` (training; loading, :func:`reglm.modeldir.load_model_dir`), at
    ``per_parameter`` bytes a parameter, would not fit in ``device``'s memory is a ReglmError
    ending with ``fix``."""
    try:
        n = count_parameters(config.model, vocab_size)
    except RuntimeError:
        raise ReglmError(f"the model is too large to build (its tensor sizes overflow); {fix}") from None
    need, have = n * per_parameter, device_memory(device)
    if have is not None and need > have:
        raise ReglmError(
            f"the model has {n:,} parameters: {purpose} needs about {need / 2**30:,.1f} GiB, more than the "
            f"{have / 2**30:,.1f} GiB of {device}; {fix}"
        )
    return n
