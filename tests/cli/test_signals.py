"""The exit status of an interrupted command is the documented 130, whenever the signals come."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from reglm.train.checkpoint import load_state

SMALL = ["data.synthetic_sentences=200", "train.epochs=2", "train.finetune_epochs=1"]


def test_two_sigterms_in_a_row_exit_130_at_any_moment(tmp_path: Path) -> None:
    """Two SIGTERMs 0.3 s apart: during the imports, the start-up, training, the checkpoint and
    the interpreter's shutdown (where Python restores the default handlers: 143 before)."""
    delays = (0.4, 1.5, 2.6, 3.7, 4.8)
    started = time.monotonic()
    procs = {}
    for delay in delays:
        procs[delay] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reglm",
                "train",
                "--preset",
                "tiny",
                "--out",
                str(tmp_path / f"run{delay}"),
                *SMALL,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    pending = sorted((started + delay + gap, delay) for delay in delays for gap in (0.0, 0.3))
    for when, delay in pending:
        time.sleep(max(0.0, when - time.monotonic()))
        if procs[delay].poll() is None:
            procs[delay].send_signal(signal.SIGTERM)
    for delay, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        if "Fatal Python error: init_import_site" in err or (
            proc.returncode == -signal.SIGTERM and not err and not (tmp_path / f"run{delay}").exists()
        ):
            continue  # on a loaded machine the signal can beat the interpreter's own start, before any code of ours
        assert proc.returncode in (0, 130), (delay, proc.returncode, err)
        assert "Traceback" not in err, err
        state = tmp_path / f"run{delay}" / "state.pt"
        if state.exists():
            load_state(state)  # whatever happened, the run stays resumable


def test_an_interrupt_caught_inside_evaluated_code_keeps_the_exit_status(tmp_path: Path) -> None:
    """A KeyboardInterrupt that ends an ``exec`` of a string (a signal landing in dataclass or
    namedtuple creation) and is caught still made ``python -m`` die by SIGINT; the program's exit
    keeps the status it decided."""
    (tmp_path / "interrupted_then_exits.py").write_text(
        "try:\n"
        "    exec('raise KeyboardInterrupt')\n"
        "except KeyboardInterrupt:\n"
        "    pass\n"
        "from reglm.__main__ import exit_with\n"
        "exit_with(130)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "interrupted_then_exits"], cwd=tmp_path, capture_output=True, timeout=60
    )
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
