"""The GPU-bound benchmark scripts run end to end at tiny sizes on a CPU, so that a lent GPU's
few minutes never meet a broken script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_transformer_body_dry_run_counts_flops_by_the_palm_convention(tmp_path: Path) -> None:
    out = tmp_path / "body.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "transformer_body.py"), "--dry-run", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = json.loads(out.read_text())
    body = result["body"]
    assert (body["layers"], body["d_model"], body["ffn_dim"]) == (2, 64, 128)
    matrices = body["layers"] * (4 * 64 * 64 + 2 * 64 * 128)
    assert result["model_flops_per_token"] == 6 * matrices + 12 * 2 * result["block"] * 64
    assert result["tokens_per_s"] > 0 and result["mfu"] is None


def test_gpu_check_dry_run_runs_every_stage_and_writes_one_json(tmp_path: Path) -> None:
    """The device check end to end on the CPU: every stage runs (or says why not), none fails."""
    proc = subprocess.run(
        [str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu-check-cpu-dry-run.json").read_text())
    stages = result["stages"]
    assert list(stages) == [name for name, _, _ in _gpu_check().STAGES]
    assert not {name: s["error"] for name, s in stages.items() if "error" in s}
    assert stages["smoke"]["passed"] >= 3 and stages["smoke"]["failed"] == 0
    assert stages["throughput"]["ratio_regularized_over_plain"] > 0
    assert stages["awd-lstm-ptb-epoch"]["seconds_per_epoch"] > 0
    assert stages["ptb-curve"]["awd-lstm-ptb"], "the curve has at least one epoch"
    assert result["dry_run"] is True and result["device"] == "cpu"
    assert "stage" in proc.stdout and f"wrote {tmp_path / 'gpu-check-cpu-dry-run.json'}" in proc.stdout


def test_qrnn_dry_run_compares_both_models_and_the_scan_with_the_loop(tmp_path: Path) -> None:
    out = tmp_path / "qrnn.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "qrnn.py"), "--dry-run", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    result = json.loads(out.read_text())
    assert (
        set(result["training"]["tokens_per_s"]) == {"qrnn", "awd-lstm"}
        and result["training"]["ratio_qrnn_over_awd_lstm"] > 0
    )
    scan = result["scan"][0]
    assert (
        scan["steps"] == 70
        and scan["max_abs_difference"] < 1e-5
        and scan["forward_backward"]["speedup_scan_over_loop"] > 0
    )


def _gpu_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    return gpu_check
