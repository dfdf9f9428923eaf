"""Shared fixtures: a fixed seed for every test and the offline benchmark data in ../shared/data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("REGLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The directory holding ptb/ and wikitext-2/ (skips the test when it is absent)."""
    if not (SHARED_DATA / "ptb" / "train.txt").is_file():
        pytest.skip(f"offline benchmark data not found at {SHARED_DATA} (set REGLM_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Generated corpora (the synthetic one) go to a per-session cache, never to ~/.cache."""
    os.environ["REGLM_DATA_DIR"] = str(tmp_path_factory.mktemp("reglm-data"))
