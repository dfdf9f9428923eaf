"""Data parallelism over the processes of a ``torchrun`` launch: ranks, shards, rank-0 gating.

``torchrun --nproc_per_node N -m reglm train ...`` (with ``--nnodes M`` and a rendezvous endpoint
across machines) starts ``N M`` processes with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`reglm.train.launch.launch` reads them and joins
the process group (``torch.distributed.init_process_group``, the ``env://`` rendezvous); without
``WORLD_SIZE`` (or with 1) it yields :data:`SINGLE`, a :class:`SingleProcess` whose every method
is the identity, so ``reglm train`` alone runs the single-process code unchanged. The trainer
calls the same hooks either way (:class:`DataParallelGroup` for ``N M > 1``).

The choices:

backend
    gloo on a CPU-only machine; with CUDA, ``cpu:gloo,cuda:nccl``: NCCL carries the gradients
    (CUDA tensors), gloo the small host-side agreements (flags, token counts, validation
    scores, the checkpoint's per-rank parts), which therefore never wait for the device.
    Each process trains on ``cuda:LOCAL_RANK``.
timeout
    ``REGLM_DIST_TIMEOUT`` seconds (default 1800) for the rendezvous and for every collective:
    a rank that dies or hangs makes the others exit instead of waiting forever (a dead peer
    is usually seen at once, as a closed connection). Both become one line per rank, exit 2
    (:class:`RankError`).
gradients
    ``DistributedDataParallel`` wraps the step engine's chunk pass (:class:`_ChunkPass`), so
    the output layer and the objective terms run inside DDP's forward; with
    ``find_unused_parameters`` only where a module says it ``skips_parameters`` (an adaptive
    input or softmax band with no token in a chunk gets no gradient): elsewhere every parameter
    has a gradient at every step, and the search would cost a graph walk per step (and a
    warning). Accumulation chunks run under DDP's ``no_sync``. DDP averages the gradients over
    the ranks, so each rank weighs a chunk by its tokens over the *mean* number of scored targets
    per rank: N ranks give the gradient of one process on the whole global batch
    (:meth:`DataParallelGroup.mean_tokens`).
data
    Each rank reads its share of the global batch the config states
    (:func:`~reglm.data.batchings.training_batches`): ``B / N`` of the streams (its own carried
    state), ``B / N`` of every batch of blocks (a distributed sampler over the epoch's seeded
    order), ``update_freq / N`` of a step's batches of sentences.
randomness
    The weights are built from the config's seed on every rank; then each rank reseeds with
    ``seed + rank`` (dropout, input noise). BPTT lengths and batch orders come from the shared
    seed, so every rank steps in lock-step.
writes
    Rank 0 alone writes the run directory; ``state.pt`` gathers every rank's part
    (:meth:`DataParallelGroup.gather_state`). Validation and the final scores are computed on
    rank 0 and broadcast: the numbers are those of a single process, and NT-ASGD's trigger, the
    plateau schedule and ``best/`` act on the same value on every rank.
errors
    A step that can fail on some ranks and not others runs in an :meth:`~DataParallelGroup.agreement`:
    every rank raises, and rank 0 reports the first failing rank's error (the command line
    prints errors on rank 0 only, :class:`RankError` on the rank that met it).
resume
    With the number of processes the run was written with (``state.pt`` records it); another
    number is refused with a message. The run directory must be readable by every rank.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from reglm.devices import resolve_device
from reglm.encoders.base import concat_states, select_streams, state_dict_of
from reglm.errors import ReglmError
from reglm.train.engine import ChunkPasses

T = TypeVar("T")

_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)
"""The models' buffers are constants, identical on every rank: no broadcast before each forward
(the keyword was renamed in newer PyTorch)."""


class RankError(ReglmError):
    """An error one process meets on its own (a rendezvous it cannot reach, the other processes
    lost): the command line prints it on every rank that has it, not on rank 0 alone."""

    every_rank = True


class SilentLog:
    """The metrics log of ranks other than 0 (rank 0 writes ``metrics.jsonl``)."""

    def log(self, **record: Any) -> None:
        """Nothing: rank 0 logs."""

    def size(self) -> int:
        return 0

    def truncate(self, size: int, first_step: int = 0) -> None:
        """Nothing: rank 0 owns the file."""

    def close(self) -> None:
        """Nothing to close."""


class SingleProcess:
    """One process: every hook is the identity (the run is exactly as without this module)."""

    rank = 0
    world_size = 1
    is_main = True

    @property
    def shard(self) -> tuple[int, int]:
        """``(rank, world size)``: which part of the global batch this process reads."""
        return self.rank, self.world_size

    def share(self, count: int) -> int:
        """This process's share of ``count`` (streams of the global batch)."""
        return count // self.world_size

    def device(self, name: str) -> torch.device:
        """The device ``train.device`` names."""
        return resolve_device(name)

    def seed(self, seed: int) -> None:
        """Nothing: the run's seed stays as it is."""

    def record(self) -> dict[str, Any]:
        """What ``environment.json`` records of the launch (nothing for one process)."""
        return {}

    @contextmanager
    def agreement(self) -> Iterator[None]:
        """The block's exceptions propagate as they are."""
        yield

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` on rank 0 (its value there, ``None`` elsewhere)."""
        return fn()

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` computed on rank 0, its value on every rank."""
        return fn()

    def max(self, value: int) -> int:
        """The largest of every rank's ``value``."""
        return value

    def sum_losses(self, nll: float, tokens: int, finite: bool) -> tuple[float, int, bool]:
        """The engine's loss sums over every rank: ``(NLL, tokens, every loss finite)``."""
        return nll, tokens, finite

    def chunk_passes(self, model: nn.Module, chunk_pass: Callable[..., Any]) -> ChunkPasses:
        """The step engine's chunk pass as it is: one process computes its own gradients."""
        return ChunkPasses.local(chunk_pass)

    def broadcast_module(self, module: nn.Module) -> None:
        """Nothing: there is no other rank to copy to."""

    def gather_state(self, state: dict[str, Any], encoder: nn.Module) -> dict[str, Any]:
        """``state`` as rank 0 writes it."""
        return state

    def local_state(self, state: dict[str, Any], encoder: nn.Module, streams: int, path: Path) -> dict[str, Any]:
        """This rank's view of a saved ``state``; a ReglmError when it was written by another number of processes."""
        _require_world(state, self.world_size, path)
        return state


SINGLE = SingleProcess()


class _ChunkPass(nn.Module):
    """What DDP wraps: the model as its one child (DDP finds and averages its parameters), and the
    step engine's chunk pass as its forward, so that every parameter a step touches -- the output
    layer's and the objective terms' too -- is used inside DDP's forward."""

    def __init__(self, model: nn.Module, chunk_pass: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.run = chunk_pass

    def forward(self, *args: Any) -> Any:
        return self.run(*args)


class DataParallelGroup(SingleProcess):
    """The processes of a ``torchrun`` launch, this one being ``rank`` of ``world_size``."""

    def __init__(self, rank: int, world_size: int, local_rank: int, owned: bool) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.is_main = rank == 0
        self.owned = owned
        """whether :func:`launch` joined the group (and leaves it), or the caller had"""

    def leave(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()

    def device(self, name: str) -> torch.device:
        """``cuda:LOCAL_RANK`` where ``train.device`` names CUDA (``auto`` on a GPU machine), else the CPU."""
        device = resolve_device(name)
        if device.type != "cuda":
            return device
        if device.index is not None:
            raise ReglmError(
                f"train.device={name}, but under torchrun every process trains on cuda:LOCAL_RANK (this one on "
                f"cuda:{self.local_rank}); set train.device=cuda or auto"
            )
        if self.local_rank >= torch.cuda.device_count():
            raise ReglmError(
                f"LOCAL_RANK={self.local_rank}, but this machine has {torch.cuda.device_count()} CUDA devices; "
                "start at most that many processes per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", self.local_rank)
        torch.cuda.set_device(device)
        return device

    def seed(self, seed: int) -> None:
        """``seed + rank`` for what each rank draws on its own (dropout, input noise)."""
        torch.manual_seed(seed + self.rank)

    def record(self) -> dict[str, Any]:
        return {
            "distributed": {
                "world_size": self.world_size,
                "backend": str(dist.get_backend()),
                "processes_per_node": env_int("LOCAL_WORLD_SIZE", None),
            }
        }

    # ------------------------------------------------------------------ agreements

    @contextmanager
    def agreement(self) -> Iterator[None]:
        """Run the block on every rank, then compare notes: when it raised on any rank, it raises
        on every rank -- its own exception where it failed, elsewhere a ReglmError naming the
        first failing rank and its message (which rank 0 prints)."""
        error: Exception | None = None
        try:
            yield
        except Exception as exc:  # every kind: the other ranks must not wait for this one
            error = exc
        notes: list[str | None] = [None] * self.world_size
        dist.all_gather_object(notes, None if error is None else _describe(error))
        if error is not None:
            raise error
        failed = next(((rank, note) for rank, note in enumerate(notes) if note is not None), None)
        if failed is not None:
            raise ReglmError(f"rank {failed[0]} of {self.world_size}: {failed[1]}")

    def on_main(self, fn: Callable[[], T]) -> T | None:
        with self.agreement():
            value = fn() if self.is_main else None
        return value

    def from_main(self, fn: Callable[[], T]) -> T:
        value = self.on_main(fn)
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max(self, value: int) -> int:
        votes = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return int(votes)

    def sum_losses(self, nll: float, tokens: int, finite: bool) -> tuple[float, int, bool]:
        """All-reduced (float64: token counts stay exact up to 2^53); any rank's non-finite loss
        makes the flag false on every rank, so all stop at the same step with one message."""
        sums = torch.tensor([nll, tokens, 0.0 if finite else 1.0], dtype=torch.float64)
        dist.all_reduce(sums)
        return float(sums[0]), int(sums[1]), bool(sums[2] == 0)

    def mean_tokens(self, tokens: int) -> float:
        """The mean over ranks of a step's scored targets, what each rank divides its chunks'
        losses by: DDP's average of the ranks' gradients is then the gradient of the summed NLL
        over every rank's targets divided by their total, as one process computes it. (With
        equal shares -- streams, blocks -- it equals ``tokens``, exactly.)"""
        total = torch.tensor([tokens], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total) / self.world_size

    # ------------------------------------------------------------------ gradients and weights

    def chunk_passes(self, model: nn.Module, chunk_pass: Callable[..., Any]) -> ChunkPasses:
        """The step engine's chunk pass made data-parallel: DDP over it, ``no_sync`` for the
        accumulation chunks, chunk weights over the mean tokens per rank. DDP copies rank 0's
        weights to every rank as it starts (they are equal already: the same seed built them)."""
        skips = model.skips_parameters
        ddp = DistributedDataParallel(
            _ChunkPass(model, chunk_pass), find_unused_parameters=skips, **_NO_FORWARD_BUFFER_SYNC
        )
        return ChunkPasses(ddp, ddp.no_sync, self.mean_tokens)

    @torch.no_grad()
    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers, copied into every rank's ``module`` in place."""
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)

    # ------------------------------------------------------------------ checkpoints

    def gather_state(self, state: dict[str, Any], encoder: nn.Module) -> dict[str, Any]:
        """``state`` with every rank's part, on rank 0 (the others' own ``state`` is not written):
        ``hidden`` the carried state of all ``B`` streams of the global batch, joined in rank
        order (what one process would carry), and ``distributed`` the world size and each
        rank's RNG states and objective state (frozen models' carried states)."""
        mine = _tensors(
            lambda t: t.detach().cpu(),
            {"rng": state["rng"], "objective": state["objective"], "hidden": state["hidden"]},
        )
        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(mine, parts, dst=0)
        if parts is None:
            return state
        hidden = (
            None
            if state["hidden"] is None
            else state_dict_of(concat_states([encoder.load_state(part["hidden"]) for part in parts]))
        )
        ranks = [{"rng": part["rng"], "objective": part["objective"]} for part in parts]
        return {**state, "hidden": hidden, "distributed": {"world_size": self.world_size, "ranks": ranks}}

    def local_state(self, state: dict[str, Any], encoder: nn.Module, streams: int, path: Path) -> dict[str, Any]:
        """This rank's part of a gathered ``state``: its RNG and objective states, and its
        ``streams / world_size`` rows of the carried state of ``streams`` streams."""
        _require_world(state, self.world_size, path)
        part = state["distributed"]["ranks"][self.rank]
        hidden = state["hidden"]
        if hidden is not None:
            rows = self.share(streams)
            mine = select_streams(encoder.load_state(hidden), slice(self.rank * rows, (self.rank + 1) * rows))
            hidden = _tensors(torch.clone, state_dict_of(mine))
        return {**state, "hidden": hidden, "rng": part["rng"], "objective": part["objective"]}


def env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RankError(
            f"{name}={value!r} in the environment is not an integer; start the processes with torchrun"
        ) from None


def _require_world(state: dict[str, Any], world: int, path: Path) -> None:
    saved = state.get("distributed", {"world_size": 1})["world_size"]
    if saved == world:
        return
    how = (
        "plain `reglm train --resume RUN` (it was a single-process run)"
        if saved == 1
        else f"{saved} processes in all (torchrun --nproc_per_node ... [--nnodes ...] -m reglm train --resume RUN)"
    )
    raise ReglmError(
        f"{path} was written by {saved} process{'es' if saved > 1 else ''} and this run has {world}; resume it "
        f"with {how}: "
        "a run's streams, carried states and random states are split per process and are not re-split for another "
        "number"
    )


def _tensors(fn: Callable[[torch.Tensor], torch.Tensor], obj: Any) -> Any:
    """``obj`` (dicts, lists, tuples of tensors and scalars: a state dict) with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {key: _tensors(fn, value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(fn, value) for value in obj)
    return obj


def _describe(exc: Exception) -> str:
    if isinstance(exc, ReglmError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {first_line(exc)}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
