"""What a run needs before its first step: the device, the corpus, and a size check.

The model's size is counted on the meta device (nothing allocated) and compared with the
device's memory, so an absurd ``model.encoder.hidden_size`` is a clear error instead of an
allocation of hundreds of gigabytes.

The corpus a run trains on is recorded in its run directory: ``state.pt`` holds the manifest hash
of the encoded-corpus cache entry it was read from (:mod:`reglm.data.cache`; ``None`` for a corpus
read in memory, the synthetic one), every session of ``environment.json`` the corpus's name, entry
and hash. Resume refuses a corpus whose hash differs from the recorded one; a run directory
written before the cache existed records none and resumes as before (its vocabulary is still
checked).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from reglm.config import RunConfig
from reglm.data import Corpus, resolve
from reglm.data.vocab import Vocab
from reglm.errors import ReglmError
from reglm.io import environment
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


def load_corpus(config: RunConfig, vocab: Vocab | None = None) -> Corpus:
    """The run's corpus; ``vocab`` (a trained model's) fixes the vocabulary, and for sub-word
    models the segmentation, instead of building them from the training split."""
    d = config.data
    corpus = resolve(
        d.name,
        data_dir=d.data_dir,
        min_freq=d.min_freq,
        max_vocab=d.max_vocab,
        synthetic_seed=d.synthetic_seed,
        synthetic_sentences=d.synthetic_sentences,
        synthetic_rule=d.synthetic_rule,
        tokenizer=d.tokenizer,
        bpe_vocab_size=d.bpe_vocab_size,
        vocab=vocab,
    )
    return training_part(corpus, d.train_part, d.train_parts)


def training_part(corpus: Corpus, part: int, parts: int) -> Corpus:
    """``corpus`` training on part ``part`` (1-based) of ``parts`` of its training stream
    (``data.train_part`` / ``data.train_parts``; Inan et al. Table 2: each half of WikiText-2),
    the vocabulary and the other splits unchanged. The stream is cut into ``parts`` runs of
    whole lines of about equal token counts: part k ends after the first ``<eos>`` at or
    beyond token ``k * N / parts``."""
    if parts == 1:
        return corpus
    ids = corpus.train
    line_ends = (ids == corpus.vocab.eos_id).nonzero().flatten() + 1
    cuts = [
        0,
        *(
            int(line_ends[min(int(torch.searchsorted(line_ends, k * ids.numel() // parts)), line_ends.numel() - 1)])
            for k in range(1, parts)
        ),
        ids.numel(),
    ]
    start, end = cuts[part - 1], cuts[part]
    if end <= start + 1:
        raise ReglmError(
            f"data.train_part={part} of data.train_parts={parts} leaves no training text ({ids.numel()} tokens in {line_ends.numel()} lines); lower data.train_parts"
        )
    word_ends = (
        None if corpus.word_ends is None else {**corpus.word_ends, "train": corpus.word_ends["train"][start:end]}
    )
    return dataclasses.replace(corpus, train=ids[start:end], word_ends=word_ends)


def manifest_hash(corpus: Corpus) -> str | None:
    """The manifest hash of the cache entry ``corpus`` was read from; ``None`` when it was read in memory."""
    return None if corpus.cache is None else corpus.cache.manifest_hash


def session_record(device: torch.device, corpus: Corpus) -> dict[str, Any]:
    """One session of ``environment.json``: versions, device and commit, and the corpus it read."""
    info = corpus.cache
    data = {
        "name": corpus.name,
        "cache": None if info is None else str(info.path),
        "manifest_hash": manifest_hash(corpus),
    }
    return {**environment(device), "data": data}


def require_same_data(recorded: str | None, corpus: Corpus, state_path: Path) -> None:
    """A ReglmError when the run in ``state_path`` recorded another encoded corpus than ``corpus``
    (nothing to compare when either has no hash: an old run directory, an in-memory corpus)."""
    have = manifest_hash(corpus)
    if recorded is not None and have is not None and recorded != have:
        raise ReglmError(
            f"{state_path} was trained on the encoded corpus {recorded[:16]}, but {corpus.name!r} now encodes to {have[:16]} "
            f"({corpus.cache.path if corpus.cache else ''}): its text or its settings changed; resume with the data the run was started on"
        )


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
    ``purpose`` (training; loading, :func:`reglm.train.checkpoint.load_model_dir`), at
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
