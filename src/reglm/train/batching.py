"""How the trainer cuts the training split into batches (``train.batching``).

:class:`StreamBatches` -- the LSTM papers': ``B`` contiguous streams read left to right in
    windows whose length is drawn per batch (AWD-LSTM 4.1, :func:`~reglm.train.schedules.sample_bptt`;
    ``train.variable_bptt``), the learning rate rescaled by ``seq_len / bptt``, the encoder's state
    carried from window to window.
:class:`BlockBatches` -- Baevski & Auli's (section 4.3): shuffled blocks of ``train.block_size``
    contiguous tokens, ``B`` per batch, each read from scratch (:class:`~reglm.data.windows.BlockPlan`).
:class:`SentenceBatches` -- their billion word batching: single sentences, similar lengths grouped
    up to ``train.max_tokens`` tokens (:class:`~reglm.data.windows.SentencePlan`), shuffled per epoch.

The last two hand ``train.update_freq`` batches to each step (accumulated, fairseq's update
frequency); the batches of an epoch that do not fill a last step are not read. All are stepped by
a position that the checkpoint saves (a column of the streams, or a batch of the epoch's shuffled
order), so a resumed run reads exactly the batches an uninterrupted one does.

Data parallelism (``shard=(rank, world_size)``, :mod:`reglm.train.distributed`): the global batch
is what the config states, and each process reads its share of it, so that the processes
together read what one process reads: rows ``rank B / W ..`` of the ``B`` streams (each process
carries its own streams' state); the same rows of every batch of blocks, from the epoch's one
seeded order (a distributed sampler); ``update_freq / W`` of a step's batches of sentences. A
count the processes cannot share evenly is a ReglmError. The position is the same on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reglm.config import TrainConfig
from reglm.data.windows import BlockPlan, SentencePlan, StreamPlan, Window
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import Reading
from reglm.train.schedules import sample_bptt


class StreamBatches:
    carries_state = True

    @staticmethod
    def context(cfg: TrainConfig) -> int:
        """The longest span of tokens the model reads at once in training (a BPTT window)."""
        return cfg.bptt

    def __init__(
        self,
        ids: Tensor,
        cfg: TrainConfig,
        seed: int,
        device: torch.device,
        eos_id: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.cfg = cfg
        _require_shares(cfg.batch_size, shard[1], "train.batch_size", "streams")
        self.plan = StreamPlan(ids, cfg.batch_size, "trim", shard=shard).to(device)
        self.rng = torch.Generator().manual_seed(seed)
        """the BPTT lengths' generator (saved in every checkpoint)"""

    @property
    def total(self) -> int:
        """Progress units of an epoch (columns of the streams)."""
        return self.plan.columns

    def done(self, position: int) -> bool:
        return position >= self.plan.columns - 1

    def fits(self, position: int) -> bool:
        return 0 <= position < self.plan.columns

    def next(self, position: int, epoch: int) -> tuple[Window, int, float]:
        """The batch at ``position``: (window, how far the position advances, learning-rate factor)."""
        cfg = self.cfg
        seq_len = (
            sample_bptt(self.rng, cfg.bptt, cfg.bptt_p, cfg.bptt_std, cfg.bptt_min, cfg.bptt_max)
            if cfg.variable_bptt
            else cfg.bptt
        )
        window = self.plan.window(position, seq_len)
        return window, window.inputs.size(1), seq_len / cfg.bptt


class _ShuffledBatches:
    """Batches read from scratch in a per-epoch shuffled order, ``train.update_freq`` per step."""

    carries_state = False
    rng = None
    plan: BlockPlan | SentencePlan

    def __init__(self, cfg: TrainConfig, part: tuple[int, int] = (0, 1)) -> None:
        self.update_freq = cfg.update_freq
        per_process = cfg.update_freq // part[1]
        self.reads = range(part[0] * per_process, (part[0] + 1) * per_process)
        """which of a step's ``update_freq`` batches this process reads (all of them, except for sentences under data parallelism)"""

    @property
    def total(self) -> int:
        """Progress units of an epoch (batches)."""
        return self.plan.batches

    def done(self, position: int) -> bool:
        """Whether fewer batches than a step takes are left (those are not read)."""
        return position + self.update_freq > self.total

    def fits(self, position: int) -> bool:
        return 0 <= position <= self.total

    def next(self, position: int, epoch: int) -> tuple[Window | list[Window], int, float]:
        """This process's batches of the step at ``position``: one window, or a list to accumulate."""
        windows = [self._batch(epoch, position + i) for i in self.reads]
        return (windows[0] if len(windows) == 1 else windows), self.update_freq, 1.0

    def _batch(self, epoch: int, index: int) -> Window:
        return self.plan.batch(epoch, index)


class BlockBatches(_ShuffledBatches):
    @staticmethod
    def context(cfg: TrainConfig) -> int:
        return cfg.block_size

    def __init__(
        self,
        ids: Tensor,
        cfg: TrainConfig,
        seed: int,
        device: torch.device,
        eos_id: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        super().__init__(cfg)
        self.rank, self.world = shard
        _require_shares(cfg.batch_size, self.world, "train.batch_size", "blocks")
        self.plan = BlockPlan(ids, cfg.block_size, cfg.batch_size // self.world, seed).to(device)
        if self.plan.batches < self.world:
            raise ReglmError(
                f"the training split holds {self.plan.n_blocks} blocks of {cfg.block_size} tokens, fewer than a batch of {cfg.batch_size}; "
                "lower train.block_size or train.batch_size"
            )

    @property
    def total(self) -> int:
        """Progress units of an epoch (global batches)."""
        return self.plan.batches // self.world

    def _batch(self, epoch: int, index: int) -> Window:
        """This process's rows of global batch ``index``: the plan's batches are ``B / W`` blocks
        of the same seeded order, so global batch ``i`` is the plan's ``i W .. i W + W - 1``."""
        return self.plan.batch(epoch, index * self.world + self.rank)


class SentenceBatches(_ShuffledBatches):
    @staticmethod
    def context(cfg: TrainConfig) -> int:
        """A sentence longer than the token budget is cut into pieces of the budget."""
        return cfg.max_tokens

    def __init__(
        self,
        ids: Tensor,
        cfg: TrainConfig,
        seed: int,
        device: torch.device,
        eos_id: int,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        _require_shares(cfg.update_freq, shard[1], "train.update_freq", "batches of sentences per step")
        super().__init__(cfg, shard)
        self.plan = SentencePlan(ids, eos_id, cfg.max_tokens, seed=seed).to(device)
        if self.plan.batches < cfg.update_freq:
            raise ReglmError(
                f"the training split makes {self.plan.batches} batches of at most {cfg.max_tokens} tokens, fewer than the "
                f"{cfg.update_freq} of one step; lower train.update_freq or train.max_tokens"
            )


BATCHES = {"bptt": StreamBatches, "blocks": BlockBatches, "sentences": SentenceBatches}


def training_batches(
    ids: Tensor, cfg: TrainConfig, seed: int, device: torch.device, eos_id: int, shard: tuple[int, int] = (0, 1)
) -> StreamBatches | BlockBatches | SentenceBatches:
    """The batches ``train.batching`` names; ``shard``: this process's share (rank, world size)."""
    return BATCHES[cfg.batching](ids, cfg, seed, device, eos_id, shard)


def trained_context(cfg: TrainConfig) -> int:
    """The longest span of tokens a model trained with ``cfg`` read at once: what a stateless
    model may attend over when it scores a longer text (in windows of this many tokens)."""
    return BATCHES[cfg.batching].context(cfg)


def _require_shares(count: int, world: int, option: str, what: str) -> None:
    if count % world:
        raise ReglmError(
            f"{option}={count} {what} cannot be split evenly over {world} processes: the config states the global batch and each "
            f"process reads 1/{world} of it; set {option} to a multiple of {world}, or start another number of processes"
        )


def eval_reading(cfg: TrainConfig, split: str, eos_id: int) -> Reading:
    """How validation (``split="valid"``) and the final scores read a split: as the run trains
    (streams, blocks with ``train.eval_context``, or sentences)."""
    batch_size = cfg.eval_batch_size if split == "valid" else cfg.test_batch_size
    if cfg.batching == "sentences":
        return Reading(batch_size, cfg.bptt, sentence_end=eos_id, max_tokens=cfg.max_tokens)
    if cfg.batching == "blocks":
        return Reading(
            batch_size, cfg.bptt, cfg.block_size, cfg.eval_context, eos_id if cfg.eval_whole_sentences else None
        )
    return Reading(batch_size, cfg.bptt)
