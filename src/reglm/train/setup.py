"""The corpus a run records: its hash, the sessions of ``environment.json``, the check on resume.

The corpus a run trains on (:func:`reglm.data.load_corpus`) is recorded in its run directory:
``state.pt`` holds the manifest hash of the encoded-corpus cache entry it was read from
(:mod:`reglm.data.cache`; ``None`` for a corpus read in memory, the synthetic one), every session
of ``environment.json`` the corpus's name, entry
and hash. Resume refuses a corpus whose hash differs from the recorded one; a run directory
written before the cache existed records none and resumes as before (its vocabulary is still
checked).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reglm.data import Corpus
from reglm.errors import ReglmError
from reglm.io import environment


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
            f"{state_path} was trained on the encoded corpus {recorded[:16]}, but {corpus.name!r} now encodes to "
            f"{have[:16]} "
            f"({corpus.cache.path if corpus.cache else ''}): its text or its settings changed; resume with the "
            "data the run was started on"
        )
