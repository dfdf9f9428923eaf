"""Data parallelism on the CPU: two gloo processes against one.

The processes are the ``reglm`` command line forked from the test with the environment torchrun
gives its workers (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), so
that each rank's exit status and messages are seen and a rank can be watched or patched; one test
goes through torchrun itself. Forking keeps PyTorch imported: a run costs its training only.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from reglm.cli import main
from reglm.config import build_config
from reglm.data import load_corpus
from reglm.data.batchings import BPTTConfig, SentencesConfig, eval_reading, training_batches
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import evaluate
from reglm.modeldir import load_model_dir
from reglm.train.checkpoint import load_state
from reglm.train.run import resume, train

CPU = ["train.device=cpu"]
"""gloo on the CPU, also on a machine with a GPU (where ``auto`` would put every rank on CUDA)."""
AWD = [
    *CPU,
    "model.*dropout=0",
    "train.small_batch_size=2",
    "train.max_steps=6",
    "train.epochs=1",
    "train.finetune=false",
    "train.log_interval=3",
]
"""The tiny AWD-LSTM without dropout, 8 streams in chunks of 2: one process takes 4 chunks, each of two ranks 2."""
TRANSFORMER = [*CPU, "model.*dropout=0", "train.clip=0", "train.max_steps=6", "train.epochs=1", "train.log_interval=3"]
"""The tiny Transformer (8 blocks a batch, chunks of 4) without dropout: one process takes 2 chunks,
each rank 1. Without clipping, which would hide a gradient scaled by the wrong token count."""
WITH_DROPOUT = [*CPU, "train.max_steps=30", "train.epochs=1", "train.finetune=false", "train.log_interval=2"]


@dataclass
class Rank:
    code: int | None
    log: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int, world: int, port: int, argv: list[str], log: Path, prepare: Callable[[int], None] | None
) -> None:
    fh = open(log, "w", buffering=1)
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sys.stdout = sys.stderr = fh
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    if prepare is not None:
        prepare(rank)
    sys.exit(main(argv))


def start(
    tmp: Path, argv: list[str], world: int = 2, ranks: range | None = None, prepare: Callable[[int], None] | None = None
) -> list[multiprocessing.Process]:
    """``reglm *argv`` as ``ranks`` (default all) of ``world`` processes, forked; ``prepare(rank)``
    runs first in each."""
    port, ctx = _free_port(), multiprocessing.get_context("fork")
    procs = []
    for rank in ranks or range(world):
        proc = ctx.Process(target=_rank_main, args=(rank, world, port, argv, tmp / f"rank{rank}.log", prepare))
        proc.start()
        procs.append(proc)
    return procs


def finish(tmp: Path, procs: list[multiprocessing.Process], timeout: float = 60) -> list[Rank]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    return [Rank(proc.exitcode, (tmp / f"rank{rank}.log").read_text()) for rank, proc in enumerate(procs)]


def launch(tmp: Path, argv: list[str], **kwargs) -> list[Rank]:
    return finish(tmp, start(tmp, argv, **kwargs))


def train_cli(preset: str, run: Path, overrides: list[str]) -> list[str]:
    return ["train", "--preset", preset, "--out", str(run), *overrides]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_state(run / "state.pt")["model"]


def assert_same_parameters(a: Path, b: Path, exact: bool = False) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        if exact:
            assert torch.equal(wa[name], wb[name]), name
        else:
            torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6, msg=name)


def _no_writes_under(root: Path) -> Callable[[int], None]:
    """A ``prepare`` that makes every write of rank 1 into ``root`` fail (an audit hook: opens for
    writing, renames, removals, new directories)."""
    top = str(root)
    writing = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path: object) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(top)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and inside(args[0]) and (args[2] or 0) & writing:
            raise PermissionError(f"rank 1 wrote {args[0]}")
        if event in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir", "os.truncate") and any(
            inside(a) for a in args[:2]
        ):
            raise PermissionError(f"rank 1 {event} {args[:2]}")

    def prepare(rank: int) -> None:
        if rank == 1:
            sys.addaudithook(hook)

    return prepare


@pytest.fixture(scope="module")
def awd_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[Rank]]:
    """The tiny AWD-LSTM trained by one process (in this one) and by two (rank 1 forbidden to write)."""
    tmp = tmp_path_factory.mktemp("awd")
    one, two = tmp / "one", tmp / "two"
    train(build_config("tiny", AWD), one, progress=False)
    ranks = launch(tmp, train_cli("tiny", two, AWD), prepare=_no_writes_under(two))
    return one, two, ranks


def test_awd_lstm_two_processes_update_as_one(awd_runs: tuple[Path, Path, list[Rank]]) -> None:
    one, two, ranks = awd_runs
    assert [r.code for r in ranks] == [0, 0], ranks[1].log
    assert load_state(two / "state.pt")["step"] == load_state(one / "state.pt")["step"] == 6
    assert_same_parameters(one, two)


def test_only_rank_0_writes_and_speaks(awd_runs: tuple[Path, Path, list[Rank]]) -> None:
    _, two, ranks = awd_runs
    events = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["step", "step", "epoch", "final"]
    (session,) = json.loads((two / "environment.json").read_text())
    assert session["distributed"] == {
        "world_size": 2,
        "backend": "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
        "processes_per_node": 2,
    }
    assert "best model:" in ranks[0].log and "reglm" not in ranks[1].log and "best model" not in ranks[1].log
    assert load_state(two / "state.pt")["distributed"]["world_size"] == 2
    assert not any(
        "find_unused_parameters" in rank.log for rank in ranks
    )  # every LSTM parameter has a gradient: no search, no warning


def test_evaluation_equals_one_process(awd_runs: tuple[Path, Path, list[Rank]]) -> None:
    """Rank 0 scores: the numbers of ``results.json`` are a single process's evaluation of ``best/``, exactly."""
    _, two, _ = awd_runs
    model, config, _ = load_model_dir(two / "best")
    corpus = load_corpus(config)
    results = json.loads((two / "results.json").read_text())
    for split in ("valid", "test"):
        assert (
            evaluate(
                model, getattr(corpus, split), reading=eval_reading(config.train.batching, split, corpus.vocab.eos_id)
            ).as_dict()
            == results[split]
        )


SENTENCES = ["train.batching=sentences", "train.max_tokens=64", "train.update_freq=2", "train.small_batch_size=none"]
"""Two batches of sentences a step: one process accumulates both, each rank reads one."""


def ragged_corpus(directory: Path) -> Path:
    """Sentences of 1 to 20 words (the synthetic corpus's are all 10 long), so that the ranks'
    batches of sentences score different numbers of tokens."""
    g = torch.Generator().manual_seed(5)
    directory.mkdir()
    for split, lines in (("train", 1200), ("valid", 60), ("test", 60)):
        text = "\n".join(
            " ".join(
                f"w{int(w)}"
                for w in torch.randint(0, 600, (int(torch.randint(1, 21, (1,), generator=g)),), generator=g)
            )
            for _ in range(lines)
        )
        (directory / f"{split}.txt").write_text(text + "\n")
    return directory


@pytest.mark.parametrize("batching", ["blocks", "sentences"])
def test_transformer_two_processes_update_as_one(tmp_path: Path, batching: str) -> None:
    """Blocks: each batch's blocks split over the ranks from the epoch's one order; sentences: a
    step's batches split, each rank's loss over the mean token count. The adaptive softmax's
    tail bands get no gradient on a rank whose chunk has no target in them."""
    batching = [] if batching == "blocks" else [*SENTENCES, f"data.name={ragged_corpus(tmp_path / 'corpus')}"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(build_config("transformer-tiny", [*TRANSFORMER, *batching]), one, progress=False)
    ranks = launch(tmp_path, train_cli("transformer-tiny", two, [*TRANSFORMER, *batching]))
    assert [r.code for r in ranks] == [0, 0], ranks[0].log
    assert_same_parameters(one, two)


def test_each_rank_reads_its_share_of_the_global_batch() -> None:
    """For every batching, the ranks' windows of a step are the one process's, in rank order."""
    ids = torch.randint(1, 50, (4000,))
    ids[::9] = 0
    blocks = build_config("transformer-tiny", ["train.batch_size=4", "train.small_batch_size=none"]).train.batching
    for cfg in (blocks, BPTTConfig(batch_size=4), SentencesConfig(max_tokens=40, update_freq=4)):
        whole = training_batches(ids, cfg, 3, torch.device("cpu"), 0)
        parts = [training_batches(ids, cfg, 3, torch.device("cpu"), 0, (rank, 2)) for rank in range(2)]
        assert whole.total == parts[0].total == parts[1].total
        for position in (0, whole.total // 2):
            batch, advance, factor = whole.next(position, 1)
            shares = [part.next(position, 1) for part in parts]
            assert all(share[1:] == (advance, factor) for share in shares)
            if cfg.kind == "sentences":
                assert [w.positions.tolist() for w in batch] == [
                    w.positions.tolist() for share in shares for w in share[0]
                ]
            else:
                assert torch.equal(batch.positions, torch.cat([share[0].positions for share in shares]))


def _torchrun(args: list[str], log: Path) -> None:
    fh = open(log, "w", buffering=1)
    os.dup2(fh.fileno(), 1)
    os.dup2(fh.fileno(), 2)
    sys.stdout = sys.stderr = fh
    from torch.distributed.run import main as torchrun

    torchrun(args)


def test_torchrun_runs_reglm_train_unchanged(tmp_path: Path, awd_runs: tuple[Path, Path, list[Rank]]) -> None:
    """``torchrun --nproc_per_node 2 -m reglm train ...``: torchrun's own command line (forked, so
    that only its two workers start Python afresh) gives the same updates as one process."""
    one, _, _ = awd_runs
    run, log = tmp_path / "run", tmp_path / "torchrun.log"
    args = ["--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "reglm", *train_cli("tiny", run, AWD)]
    agent = multiprocessing.get_context("fork").Process(target=_torchrun, args=(args, log))
    agent.start()
    agent.join(180)
    assert agent.exitcode == 0, log.read_text()[-3000:]
    assert log.read_text().count("best model:") == 1
    assert_same_parameters(one, run)


def _when_logging(run: Path) -> None:
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 60
    while not (metrics.is_file() and '"step"' in metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sigterm_on_one_rank_checkpoints_once_and_resumes_bit_exactly(tmp_path: Path) -> None:
    """Dropout on, so every rank's own RNG state must come back."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    (tmp_path / "ref").mkdir()
    uninterrupted = start(tmp_path / "ref", train_cli("tiny", reference, WITH_DROPOUT))
    procs = start(tmp_path, train_cli("tiny", run, WITH_DROPOUT))
    _when_logging(run)
    os.kill(procs[1].pid, signal.SIGTERM)
    ranks = finish(tmp_path, procs)
    assert [r.code for r in ranks] == [130, 130], ranks[0].log
    assert ranks[0].log.count("checkpoint saved") == 1 and "reglm: interrupted" not in ranks[1].log
    stopped = load_state(run / "state.pt")
    assert 0 < stopped["step"] < 30
    assert [h.shape[1] for h, _ in stopped["hidden"]] == [8, 8], (
        "the carried state of all 8 streams, gathered from both ranks"
    )
    (tmp_path / "resume").mkdir()
    resumed = launch(tmp_path / "resume", ["train", "--resume", str(run)])
    assert [r.code for r in resumed] == [0, 0], resumed[0].log
    assert [r.code for r in finish(tmp_path / "ref", uninterrupted)] == [0, 0]
    assert load_state(run / "state.pt")["step"] == 30
    assert_same_parameters(reference, run, exact=True)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()
    ]


def _nan_at_step_4(rank: int) -> None:
    """On rank 1: the fourth chunk's loss (step 4, the log interval's last) is NaN; rank 0's losses stay finite."""
    if rank != 1:
        return
    from reglm.objectives import objective

    original, calls = objective.LMObjective.chunk_loss, [0]

    def chunk_loss(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        calls[0] += 1
        return type(loss)(loss.nll * float("nan"), loss.penalty) if calls[0] == 4 else loss

    objective.LMObjective.chunk_loss = chunk_loss


def test_nan_on_rank_1_stops_both_with_exit_3_and_one_message(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ranks = launch(
        tmp_path,
        train_cli("tiny", run, [*CPU, "train.max_steps=10", "train.log_interval=4", "train.finetune=false"]),
        prepare=_nan_at_step_4,
    )
    assert [r.code for r in ranks] == [3, 3], ranks[0].log
    assert "reglm: error: the training loss became NaN or infinite (at or before this step) at step 4" in ranks[0].log
    assert "reglm: error" not in ranks[1].log
    state = load_state(run / "state.pt")
    assert state["step"] == 0 and all(t.isfinite().all() for t in state["model"].values())


def test_bad_input_is_one_error_on_rank_0_and_exit_2_everywhere(
    tmp_path: Path, awd_runs: tuple[Path, Path, list[Rank]]
) -> None:
    one, two, _ = awd_runs
    (tmp_path / "batch").mkdir()
    ranks = launch(tmp_path / "batch", train_cli("tiny", tmp_path / "odd", [*CPU, "train.batch_size=5"]))
    assert [r.code for r in ranks] == [2, 2]
    assert (
        "reglm: error: train.batching.batch_size=5 streams cannot be split evenly over 2 processes" in ranks[0].log
        and "reglm: error" not in ranks[1].log
    )
    assert not (tmp_path / "odd").exists()

    (tmp_path / "resume").mkdir()
    ranks = launch(tmp_path / "resume", ["train", "--resume", str(one)])
    assert [r.code for r in ranks] == [2, 2]
    assert (
        "was written by 1 process and this run has 2; resume it with plain `reglm train --resume RUN`" in ranks[0].log
    )
    with pytest.raises(
        ReglmError, match="was written by 2 processes and this run has 1; resume it with 2 processes in all"
    ):
        resume(two, progress=False)

    (tmp_path / "alone").mkdir()
    os.environ["REGLM_DIST_TIMEOUT"] = "1"
    try:
        ranks = launch(tmp_path / "alone", train_cli("tiny", tmp_path / "alone-run", AWD), ranks=range(1))
    finally:
        del os.environ["REGLM_DIST_TIMEOUT"]
    assert ranks[0].code == 2
    assert "reglm: error: rank 0 of 2: could not join the other processes at the rendezvous 127.0.0.1:" in ranks[0].log


def test_a_damaged_distributed_entry_is_refused(tmp_path: Path, awd_runs: tuple[Path, Path, list[Rank]]) -> None:
    _, two, _ = awd_runs
    state = load_state(two / "state.pt")
    assert state["hidden"] is None and len(state["distributed"]["ranks"]) == 2
    state["distributed"]["world_size"] = 3
    torch.save(state, tmp_path / "state.pt")
    with pytest.raises(
        ReglmError, match="is damaged: its 'distributed' entry is not the world size and every process's RNG"
    ):
        load_state(tmp_path / "state.pt")


def test_a_rank_that_dies_makes_the_other_exit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = start(tmp_path, train_cli("tiny", run, WITH_DROPOUT))
    _when_logging(run)
    os.kill(procs[1].pid, signal.SIGKILL)
    ranks = finish(tmp_path, procs, timeout=30)
    assert ranks[0].code == 2 and ranks[1].code == -signal.SIGKILL
    assert "reglm: error: rank 0 of 2: lost contact with the other processes" in ranks[0].log


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_nccl_on_two_gpus_updates_as_one_gpu(tmp_path: Path) -> None:
    """NCCL through torchrun (fresh worker processes: CUDA cannot be forked), against one GPU; to
    float rounding, which cuDNN and the reduction order do not keep bit-exact."""
    cuda = ["train.device=cuda", *TRANSFORMER[1:]]
    one, two, log = tmp_path / "one", tmp_path / "two", tmp_path / "torchrun.log"
    args = [
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "reglm",
        *train_cli("transformer-tiny", two, cuda),
    ]
    agent = multiprocessing.get_context("fork").Process(target=_torchrun, args=(args, log))
    agent.start()
    agent.join(300)
    assert agent.exitcode == 0, log.read_text()[-3000:]
    assert json.loads((two / "environment.json").read_text())[0]["distributed"]["backend"] == "cpu:gloo,cuda:nccl"
    train(build_config("transformer-tiny", cuda), one, progress=False)
    wa, wb = weights(one), weights(two)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-5, msg=name)
