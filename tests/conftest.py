"""Shared fixtures: a fixed seed for every test and the offline benchmark data in ../shared/data.

Every test, and every ``reglm`` process a test starts (they inherit the environment), runs torch
on one thread: the models are tiny, and threads spinning against a busy machine made them slower
by orders of magnitude; in-process and subprocess runs also compute alike, which the bit-exact
resume tests compare.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip with a reason where no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
