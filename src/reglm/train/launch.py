"""Joining the processes of a ``torchrun`` launch (:func:`launch`): the environment's
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, the rendezvous and its timeout
(``REGLM_DIST_TIMEOUT``), and a lost peer turned into a :class:`~reglm.train.distributed.RankError`.
What the processes then do together is :mod:`reglm.train.distributed`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from reglm.train.distributed import SINGLE, DataParallelGroup, RankError, SingleProcess, env_int, first_line

TIMEOUT_ENV = "REGLM_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
"""Seconds a rank waits at the rendezvous and in any collective (PyTorch's own default)."""


@contextmanager
def launch() -> Iterator[SingleProcess]:
    """The processes of this run: :data:`SINGLE` unless ``WORLD_SIZE`` > 1, else the joined
    process group (left at the end; a group the caller had joined is used and kept). A
    collective that fails because another rank is gone becomes a :class:`RankError`."""
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield SINGLE
        return
    group = _join(world)
    try:
        yield group
    except RuntimeError as exc:
        if not _lost_contact(exc):
            raise
        raise RankError(
            f"rank {group.rank} of {world}: lost contact with the other processes ({first_line(exc)}); one of them "
            "failed, was killed "
            "or hangs (its own output says why). Resume from the last checkpoint with the same number of processes "
            "(torchrun ... -m reglm train --resume RUN)"
        ) from None
    finally:
        group.leave()


def _join(world: int) -> DataParallelGroup:
    if not dist.is_available():
        raise RankError(
            f"WORLD_SIZE={world}, but this PyTorch build has no torch.distributed; run one process (plain reglm train)"
        )
    rank, timeout = env_int("RANK", None), _timeout()
    if rank is None or not 0 <= rank < world:
        raise RankError(
            f"WORLD_SIZE={world} needs RANK in [0, {world}) in the environment; start the processes with torchrun"
        )
    local_rank = env_int("LOCAL_RANK", rank)
    owned = not dist.is_initialized()
    if owned:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as exc:
            addr = os.environ.get("MASTER_ADDR", "(MASTER_ADDR unset)")
            where = f"{addr}:{os.environ.get('MASTER_PORT', '(MASTER_PORT unset)')}"
            raise RankError(
                f"rank {rank} of {world}: could not join the other processes at the rendezvous {where} within "
                f"{timeout:g} s ({first_line(exc)}); "
                f"start all {world} processes (torchrun --nproc_per_node N, with --nnodes M --rdzv-endpoint "
                "HOST:PORT on every node), "
                f"check that the endpoint is reachable from every node, or set {TIMEOUT_ENV} to wait longer"
            ) from None
    elif dist.get_world_size() != world or dist.get_rank() != rank:
        raise RankError(
            f"the process group already joined has rank {dist.get_rank()} of {dist.get_world_size()}, but the "
            f"environment says {rank} of {world}"
        )
    return DataParallelGroup(rank, world, local_rank, owned)


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RankError(f"{TIMEOUT_ENV}={value!r} must be a number of seconds > 0")
    return seconds


def _lost_contact(exc: RuntimeError) -> bool:
    """Whether ``exc`` is a collective that failed for want of a peer: PyTorch raises its
    ``DistError`` family for NCCL and the store, and gloo a plain RuntimeError from its transport."""
    return isinstance(exc, dist.DistError) or "gloo/transport" in str(exc)
