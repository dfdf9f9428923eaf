"""Failures a hostile but realistic user meets: every one ends in a clear error (exit 2, one line,
no traceback), no run directory becomes a dead end, and no file on disk is lost or changed."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reglm.cli import main
from reglm.config import build_config
from reglm.data import load_corpus
from reglm.errors import ReglmError, TrainingDiverged
from reglm.evaluate.perplexity import EvalResult, perplexity
from reglm.rundir import LOCK_FILE, acquire
from reglm.train.checkpoint import load_state
from reglm.train.run import Trainer, resume, train

SMALL = ["data.synthetic_sentences=200", "train.epochs=2", "train.finetune_epochs=1", "train.checkpoint_interval=10"]


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expect_error(capsys: pytest.CaptureFixture, fragment: str, *argv: str, code: int = 2) -> str:
    rc, _, err = run_cli(capsys, *argv)
    assert rc == code, err
    assert "Traceback" not in err and err.startswith("reglm: error:"), err
    assert len(err.strip().splitlines()) == 1 or code != 2, err
    assert fragment in err, err
    return err


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` (the lock file aside) and its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def cli(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reglm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    train(build_config("tiny", SMALL), run, progress=False)
    return run


# ------------------------------------------------------------------ no dead ends


def test_kill_9_at_random_moments_never_leaves_a_dead_end(tmp_path: Path, reference: Path) -> None:
    """Ten runs killed at random moments, half during start-up and half once the run directory is
    claimed: each directory either does not hold a run yet (and takes a fresh one) or resumes,
    and ends bit-equal to the reference."""
    rng = random.Random(11)
    outcomes = []
    for trial in range(10):
        run = tmp_path / f"trial{trial}"
        proc = cli("train", "--preset", "tiny", "--out", str(run), *SMALL)
        if trial % 2:
            deadline = time.time() + 120
            while not (run / "config.json").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 2.0))
        else:
            time.sleep(rng.uniform(0.2, 2.5))
        proc.kill()
        proc.communicate()
        if run.is_dir() and (run / "config.json").is_file():
            outcomes.append("resumed")
            resume(run, progress=False)
        else:
            outcomes.append("fresh")
            train(build_config("tiny", SMALL), run, progress=False)
        for sub in ("best", "last"):
            assert same_weights(reference / sub, run / sub), (trial, sub)
        assert not list(run.rglob("*.tmp")), trial
    assert outcomes.count("resumed") >= 5, outcomes


def test_a_run_killed_before_its_first_checkpoint_starts_over(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(build_config("tiny", SMALL).to_dict()))
    (run / f".state.pt.{os.getpid()}.0123abcd.tmp").write_bytes(b"torn")
    rc, _, err = run_cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert "starting it over" in err
    assert same_weights(reference / "best", run / "best")
    assert not list(run.rglob("*.tmp")), "leftover temporary files are removed"


def test_state_is_written_before_the_first_step(tmp_path: Path) -> None:
    config = build_config("tiny", SMALL)
    trainer = Trainer(config, tmp_path / "run", load_corpus(config), progress=False)
    trainer.start()
    try:
        state = load_state(tmp_path / "run" / "state.pt")
        assert (state["stage"], state["epoch"], state["step"]) == ("main", 0, 0)
    finally:
        trainer.close()


# ------------------------------------------------------------------ one process per run


def test_two_trainings_into_one_out(tmp_path: Path, reference: Path) -> None:
    run = tmp_path / "run"
    procs = [cli("train", "--preset", "tiny", "--out", str(run), *SMALL) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser
    assert "in use by another reglm process (pid" in loser or "already holds a run" in loser, loser
    assert same_weights(reference / "best", run / "best")


def test_a_held_run_is_refused_and_a_stale_lock_taken_over(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    lock = acquire(run)
    try:
        err = expect_error(capsys, f"pid {os.getpid()}", "train", "--resume", str(run))
        assert "in use by another reglm process" in err
        expect_error(capsys, "already holds a run", "train", "--preset", "tiny", "--out", str(run))
    finally:
        lock.release()
    assert snapshot(run) == before
    (run / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "earlier"}))
    rc, _, err = run_cli(capsys, "train", "--resume", str(run))
    assert rc == 0 and "pid 999999 on host elsewhere" in err and "is gone" in err, err


# ------------------------------------------------------------------ user files


def test_out_that_is_not_a_run_is_refused_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "vocab.txt").write_text("my own words\n")
    (mine / "results.json").write_text("{}")
    before = snapshot(mine)
    expect_error(capsys, "not empty and holds no run", "train", "--preset", "tiny", "--out", str(mine))
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["results.json", "vocab.txt"]

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    expect_error(capsys, "is a file", "train", "--preset", "tiny", "--out", str(a_file))
    expect_error(capsys, "is a file", "train", "--preset", "tiny", "--out", str(a_file / "run"))
    assert a_file.read_text() == "keep me"


def test_files_are_written_with_the_usual_permissions(reference: Path) -> None:
    expected = 0o666 & ~_umask()
    for path in (reference / "best" / "model.safetensors", reference / "state.pt", reference / "config.json"):
        assert path.stat().st_mode & 0o777 == expected, path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ divergence


def _poison_at_epoch_end(epoch: int, rows: slice | None = None):
    def hook(trainer: Trainer) -> None:
        if trainer.epoch == epoch - 1 and trainer.batches.done(trainer.position):
            with torch.no_grad():
                weight = trainer.model.embedding.weight
                (weight if rows is None else weight[rows]).fill_(float("nan"))

    return hook


def test_nan_validation_at_an_epoch_end_writes_nothing(tmp_path: Path) -> None:
    config = build_config("tiny", SMALL)
    run = tmp_path / "run"
    trainer = Trainer(config, run, load_corpus(config), progress=False)
    trainer.step_hooks.append(_poison_at_epoch_end(2))
    trainer.start()
    with pytest.raises(
        TrainingDiverged,
        match=r"validation score became nan.*Last good checkpoint: .*state.pt \(stage main, epoch 1, step \d+\)",
    ):
        trainer.run()
    state = load_state(run / "state.pt")
    assert (state["stage"], state["epoch"]) == ("main", 1)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    for sub in ("best", "last"):
        assert all(torch.isfinite(t).all() for t in load_file(str(run / sub / "model.safetensors")).values())
        assert json.loads((run / sub / "config.json").read_text())["info"]["epoch"] == 1


def test_a_non_finite_parameter_is_divergence_even_with_a_finite_loss(tmp_path: Path) -> None:
    """An untied input embedding row of a word that never occurs after the poisoning point."""
    config = build_config("tiny", [*SMALL, "model.tie_weights=false"])
    corpus = load_corpus(config)
    present = set(corpus.valid.tolist()) | set(corpus.train.tolist())
    absent = next(i for i in range(len(corpus.vocab)) if i not in present)
    trainer = Trainer(config, tmp_path / "run", corpus, progress=False)
    trainer.step_hooks.append(_poison_at_epoch_end(1, slice(absent, absent + 1)))
    trainer.start()
    with pytest.raises(TrainingDiverged, match="a parameter became NaN or infinite"):
        trainer.run()
    assert not (tmp_path / "run" / "best").exists()


def test_divergence_exits_3_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc, _, err = run_cli(
        capsys, "train", "--preset", "tiny", "--out", str(tmp_path / "run"), *SMALL, "train.lr=1e30", "train.clip=0"
    )
    assert rc == 3 and "Traceback" not in err and "Last good checkpoint" in err, err


def test_perplexity_never_overflows() -> None:
    assert perplexity(1e6) == math.inf and perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert math.isnan(perplexity(math.nan))
    assert EvalResult(loss=1e300, tokens=3).as_dict()["ppl"] == math.inf


# ------------------------------------------------------------------ the operating system


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_a_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path: Path, reference: Path) -> None:
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "720k"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        run = disk / "run"
        proc = cli("train", "--preset", "tiny", "--out", str(run), *SMALL)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err
        assert "Traceback" not in err and "No space left on device" in err and str(run) in err, err
        assert not list(run.rglob("*.tmp")), "a failed write removes its temporary file"
        load_state(run / "state.pt")
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        resume(run, progress=False)
        assert same_weights(reference / "best", run / "best")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def _without_file_permissions() -> list[str]:
    """A command prefix that runs as root without the capability to bypass file permissions."""
    probe = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("setpriv cannot drop capabilities here")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]


def test_unreadable_and_unwritable_files_are_clear_errors(tmp_path: Path, reference: Path) -> None:
    prefix = _without_file_permissions() if os.geteuid() == 0 else []
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    weights = run / "best" / "model.safetensors"
    weights.chmod(0)
    out = subprocess.run([*prefix, sys.executable, "-m", "reglm", "eval", str(run)], capture_output=True, text=True)
    assert (
        out.returncode == 2
        and "Traceback" not in out.stderr
        and "Permission denied" in out.stderr
        and str(weights) in out.stderr
    ), out.stderr
    weights.chmod(0o644)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    out = subprocess.run(
        [*prefix, sys.executable, "-m", "reglm", "train", "--preset", "tiny", "--out", str(locked / "run"), *SMALL],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Permission denied" in out.stderr, out.stderr
    assert list(locked.iterdir()) == []


def test_sigint_during_start_up_exits_130_without_a_traceback(tmp_path: Path) -> None:
    for delay in (0.2, 0.5, 0.9, 1.4):
        # a terminal's disposition: a job started in the background may inherit SIGINT ignored
        proc = cli(
            "train",
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / f"run{delay}"),
            *SMALL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if "Fatal Python error: init_import_site" in err:
            continue  # on a loaded machine the signal can beat the interpreter's own start, before any code of ours
        assert proc.returncode in (130, -signal.SIGINT), err
        assert "Traceback" not in err, err


# ------------------------------------------------------------------ bad values


def test_absurd_sizes_and_seeds_are_refused_before_allocating(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    started = time.perf_counter()
    expect_error(
        capsys,
        "lower model.encoder.hidden_size",
        "train",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "a"),
        "model.hidden_size=1000000000",
    )
    expect_error(
        capsys,
        "lower model.encoder.hidden_size",
        "train",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "b"),
        "model.hidden_size=2000000",
    )
    assert time.perf_counter() - started < 30
    expect_error(capsys, "seed", "train", "--preset", "tiny", "--out", str(tmp_path / "c"), "seed=99999999999999999999")
    expect_error(capsys, "seed", "train", "--preset", "tiny", "--out", str(tmp_path / "d"), "seed=-1")
    expect_error(
        capsys,
        "train.batching.eval_batch_size",
        "train",
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "e"),
        *SMALL,
        "train.eval_batch_size=100000",
    )
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_damaged_state_entries_are_refused_before_anything_is_written(
    tmp_path: Path, reference: Path, capsys: pytest.CaptureFixture
) -> None:
    for entry, value in (
        ("step", None),
        ("stage", "sideways"),
        ("epoch_nll", "x"),
        ("model", {"embedding.weight": torch.zeros(2, 2)}),
        ("optimizer", {"state": {}, "param_groups": []}),
        ("position", 10**9),
    ):
        run = tmp_path / f"run-{entry}"
        shutil.copytree(reference, run)
        state = torch.load(run / "state.pt", weights_only=True)
        if value is None:
            del state[entry]
        else:
            state[entry] = value
        torch.save(state, run / "state.pt")
        before = snapshot(run)
        err = expect_error(capsys, "state.pt", "train", "--resume", str(run))
        assert entry in err or "does not fit" in err, err
        assert snapshot(run) == before, f"{entry}: nothing may be rewritten (environment.json included)"


def test_sampling_at_a_vanishing_temperature_is_greedy(reference: Path, capsys: pytest.CaptureFixture) -> None:
    outs = []
    for seed in ("1", "2"):
        rc, out, err = run_cli(
            capsys, "generate", str(reference), "--words", "15", "--temperature", "1e-45", "--seed", seed
        )
        assert rc == 0, err
        outs.append(out)
    assert outs[0] == outs[1], "a vanishing temperature leaves no randomness"
    import reglm

    lm = reglm.load(reference)
    ids = [lm.vocab.eos_id]
    with torch.no_grad():
        for _ in range(15):
            log_p, _ = lm.model.log_probs(torch.tensor([ids]))
            ids.append(int(log_p[0, -1].argmax()))
    greedy = lm.vocab.decode(ids[1:])
    assert outs[0].split() == [t for t in greedy if t != "<eos>"]


def test_generate_streams_and_has_no_upper_bound(reference: Path) -> None:
    import reglm

    lm = reglm.load(reference)
    tokens = lm.stream(10**12, seed=0, prompt="w1")
    assert next(tokens) == "w1"
    assert all(isinstance(next(tokens), str) for _ in range(5))


def test_prompt_hint_matches_the_vocabulary(reference: Path, capsys: pytest.CaptureFixture) -> None:
    err = expect_error(capsys, "not in the model's vocabulary", "generate", str(reference), "--prompt", "zebra")
    assert ("<unk>" in err) == reglm_has_unk(reference)


def reglm_has_unk(run: Path) -> bool:
    return "<unk>\t" in (run / "vocab.txt").read_text()


# ------------------------------------------------------------------ the library


def test_the_library_installs_no_signal_handler_and_lets_keyboard_interrupt_through(tmp_path: Path) -> None:
    seen = []

    def hook(trainer: Trainer) -> None:
        seen.append(signal.getsignal(signal.SIGINT))
        if trainer.step == 3:
            raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train(build_config("tiny", SMALL), tmp_path / "run", progress=False, step_hooks=[hook])
    assert seen and all(h is before for h in seen)
    resume(tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "results.json").is_file()


def test_resume_refuses_what_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect_error(capsys, "does not exist", "train", "--resume", str(tmp_path / "nothing"))
    (tmp_path / "file").write_text("x")
    expect_error(capsys, "is a file", "train", "--resume", str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    expect_error(capsys, "holds no run", "train", "--resume", str(tmp_path / "empty"))
    with pytest.raises(ReglmError, match="holds no run"):
        resume(tmp_path / "empty", progress=False)
