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

    def __init__(self, ids: Tensor, cfg: TrainConfig, seed: int, device: torch.device, eos_id: int) -> None:
        self.cfg = cfg
        self.plan = StreamPlan(ids, cfg.batch_size, "trim").to(device)
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
        seq_len = sample_bptt(self.rng, cfg.bptt, cfg.bptt_p, cfg.bptt_std, cfg.bptt_min, cfg.bptt_max) if cfg.variable_bptt else cfg.bptt
        window = self.plan.window(position, seq_len)
        return window, window.inputs.size(1), seq_len / cfg.bptt


class _ShuffledBatches:
    """Batches read from scratch in a per-epoch shuffled order, ``train.update_freq`` per step."""

    carries_state = False
    rng = None
    plan: BlockPlan | SentencePlan

    def __init__(self, cfg: TrainConfig) -> None:
        self.update_freq = cfg.update_freq

    @property
    def total(self) -> int:
        """Progress units of an epoch (batches)."""
        return self.plan.batches

    def done(self, position: int) -> bool:
        """Whether fewer batches than a step takes are left (those are not read)."""
        return position + self.update_freq > self.plan.batches

    def fits(self, position: int) -> bool:
        return 0 <= position <= self.plan.batches

    def next(self, position: int, epoch: int) -> tuple[Window | list[Window], int, float]:
        if self.update_freq == 1:
            return self.plan.batch(epoch, position), 1, 1.0
        return [self.plan.batch(epoch, position + i) for i in range(self.update_freq)], self.update_freq, 1.0


class BlockBatches(_ShuffledBatches):
    def __init__(self, ids: Tensor, cfg: TrainConfig, seed: int, device: torch.device, eos_id: int) -> None:
        super().__init__(cfg)
        self.plan = BlockPlan(ids, cfg.block_size, cfg.batch_size, seed).to(device)


class SentenceBatches(_ShuffledBatches):
    def __init__(self, ids: Tensor, cfg: TrainConfig, seed: int, device: torch.device, eos_id: int) -> None:
        super().__init__(cfg)
        self.plan = SentencePlan(ids, eos_id, cfg.max_tokens, seed=seed).to(device)
        if self.plan.batches < cfg.update_freq:
            raise ReglmError(
                f"the training split makes {self.plan.batches} batches of at most {cfg.max_tokens} tokens, fewer than the "
                f"{cfg.update_freq} of one step; lower train.update_freq or train.max_tokens"
            )


BATCHES = {"bptt": StreamBatches, "blocks": BlockBatches, "sentences": SentenceBatches}


def training_batches(ids: Tensor, cfg: TrainConfig, seed: int, device: torch.device, eos_id: int) -> StreamBatches | BlockBatches | SentenceBatches:
    """The batches ``train.batching`` names."""
    return BATCHES[cfg.batching](ids, cfg, seed, device, eos_id)


def eval_reading(cfg: TrainConfig, split: str, eos_id: int) -> Reading:
    """How validation (``split="valid"``) and the final scores read a split: as the run trains
    (streams, blocks with ``train.eval_context``, or sentences)."""
    batch_size = cfg.eval_batch_size if split == "valid" else cfg.test_batch_size
    if cfg.batching == "sentences":
        return Reading(batch_size, cfg.bptt, sentence_end=eos_id, max_tokens=cfg.max_tokens)
    if cfg.batching == "blocks":
        return Reading(batch_size, cfg.bptt, cfg.block_size, cfg.eval_context, eos_id if cfg.eval_whole_sentences else None)
    return Reading(batch_size, cfg.bptt)
