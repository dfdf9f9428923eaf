"""The GPU-bound benchmark scripts run end to end at tiny sizes on a CPU, so that a lent GPU's
few minutes never meet a broken script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_transformer_body_dry_run_counts_flops_by_the_palm_convention(tmp_path: Path) -> None:
    out = tmp_path / "body.json"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "transformer_body.py"), "--dry-run", "--out", str(out)], check=True, capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    body = result["body"]
    assert (body["layers"], body["d_model"], body["ffn_dim"]) == (2, 64, 128)
    matrices = body["layers"] * (4 * 64 * 64 + 2 * 64 * 128)
    assert result["model_flops_per_token"] == 6 * matrices + 12 * 2 * result["block"] * 64
    assert result["tokens_per_s"] > 0 and result["mfu"] is None
