"""Claiming a run directory: a second process that arrives while the holder writes its first
files is told the directory is in use, never that it is someone else's non-empty directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reglm.errors import ReglmError
from reglm.rundir import claim_new


def _claim_elsewhere(run: Path) -> str:
    code = f"from pathlib import Path\nfrom reglm.rundir import claim_new\nclaim_new(Path({str(run)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    return proc.stderr.strip().splitlines()[-1]


def test_a_claim_during_the_holders_first_write_names_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with claim_new(run):
        (run / ".config.json.123.abcdef01.tmp").write_text("{")  # the holder's config, half written
        assert "is in use by another reglm process (pid" in _claim_elsewhere(run)


def test_a_directory_whose_holder_is_gone_is_judged_by_its_contents(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with claim_new(run):
        (run / "notes.txt").write_text("the user's")
    with pytest.raises(ReglmError, match=r"not empty and holds no run \(notes\.txt\)"):
        claim_new(run)
    assert (run / "notes.txt").read_text() == "the user's"
