"""The batching family (``train.batching``): how the training split is cut into batches, and how
validation and the final scores read a split. Each kind is one registered class whose ``Config``
holds the options only it reads:

``bptt`` -- :class:`StreamBatches`, the LSTM papers': ``batch_size`` contiguous streams read left
    to right in windows whose length is drawn per batch (AWD-LSTM 4.1, :func:`sample_bptt`;
    ``variable_bptt``), the learning rate rescaled by ``seq_len / bptt``, the encoder's state
    carried from window to window. Validation reads streams in windows of ``bptt``.
``blocks`` -- :class:`BlockBatches`, Baevski & Auli's (section 4.3): shuffled blocks of
    ``block_size`` contiguous tokens, ``batch_size`` per batch, each read from scratch
    (:class:`~reglm.data.windows.BlockPlan`). Validation reads blocks of ``block_size`` whose
    first ``eval_context`` tokens only give context.
``sentences`` -- :class:`SentenceBatches`, their billion word batching: single sentences, similar
    lengths grouped up to ``max_tokens`` tokens (:class:`~reglm.data.sentence_plan.SentencePlan`),
    shuffled per epoch; validation reads sentences the same way.

The last two hand ``update_freq`` batches to each step (accumulated, fairseq's update
frequency); the batches of an epoch that do not fill a last step are not read. All are stepped by
a position that the checkpoint saves (a column of the streams, or a batch of the epoch's shuffled
order), so a resumed run reads exactly the batches an uninterrupted one does.

Every kind also states how it is read at evaluation (:meth:`reading`: validation's and the
final test's batch sizes, ``eval_batch_size`` and ``test_batch_size``, are options of every kind),
the longest span a model trained with it read at once (:meth:`context`), and the block length an
evaluation mode that reads blocks only uses for a run (:meth:`eval_block`). Inference reads these
through :func:`eval_reading`, :func:`trained_context` and :func:`eval_block`, without the trainer.

Data parallelism (``shard=(rank, world_size)``, :mod:`reglm.train.distributed`): the global batch
is what the config states, and each process reads its share of it, so that the processes
together read what one process reads: rows ``rank B / W ..`` of the ``B`` streams (each process
carries its own streams' state); the same rows of every batch of blocks, from the epoch's one
seeded order (a distributed sampler); ``update_freq / W`` of a step's batches of sentences. A
count the processes cannot share evenly is a ReglmError. The position is the same on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from reglm.config.fields import check, kind_field, option
from reglm.data.sentence_plan import SentencePlan
from reglm.data.windows import BlockPlan, StreamPlan, Window
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import Reading

EVAL_BPTT = Reading.bptt
"""The window of a stream reading at evaluation for a run that does not train on streams
(an evaluation mode that reads streams, such as the cache, reads such a run in windows of it)."""
EVAL_BLOCK = 512
"""The block length an evaluation mode that reads blocks only (``--context-window``) uses for a
run that does not train on blocks."""


def sample_bptt(
    generator: torch.Generator,
    bptt: int,
    p: float = 0.95,
    std: float = 5.0,
    min_len: int = 5,
    max_len: int | None = None,
) -> int:
    """Draw one BPTT length (AWD-LSTM 4.1): ``round(N(base, std))`` with ``base = bptt`` w.p. ``p``, else ``bptt / 2``.

    A fixed BPTT window always cuts the stream at the same positions, so every token at a
    multiple of the window gets no recurrent gradient at all; each batch therefore draws its own
    length, and its learning rate is rescaled by ``seq_len / bptt`` (:func:`scaled_lr`) so that
    short batches do not weigh as much as full ones (the paper's linear scaling rule).

    Exactly two numbers are drawn from ``generator`` (a CPU generator, saved in every checkpoint)
    per call, whatever ``p`` and ``std`` are: one uniform for the choice of base, one standard
    normal for the jitter.

    Rounding: the normal sample is rounded to the *nearest* integer (halves up), so the
    full-length component has mean ``bptt``. The reference AWD-LSTM code truncates with
    ``int()`` instead, which shifts every length down by 0.5 on average.

    The result is clipped to ``[min_len, max_len]`` (``max_len=None``: no upper bound; the
    reference code uses ``min_len=5`` and, against rare out-of-memory lengths, ``max_len=bptt+10``).
    ``max_len`` must be ``>= min_len``.
    """
    use_full = torch.rand((), generator=generator).item() < p
    noise = torch.randn((), generator=generator).item()
    base = bptt if use_full else bptt / 2
    length = max(min_len, math.floor(base + std * noise + 0.5))
    if max_len is not None:
        length = min(max_len, length)
    return length


def scaled_lr(lr: float, seq_len: int, bptt: int) -> float:
    """The learning rate for a batch of ``seq_len`` steps: ``lr * seq_len / bptt`` (AWD-LSTM 4.1)."""
    return lr * seq_len / bptt


@dataclass(frozen=True)
class EvalBatchSizes:
    """The options of every batching kind: the batch sizes of validation and of the final test."""

    eval_batch_size: int = option(10, "streams (or blocks) per batch for validation")
    test_batch_size: int = option(1, "streams (or blocks) per batch for the final test evaluation")

    def __post_init__(self) -> None:
        for name in ("eval_batch_size", "test_batch_size"):
            _at_least_one(self, name)

    def batch_size_for(self, split: str) -> int:
        return self.eval_batch_size if split == "valid" else self.test_batch_size


def _at_least_one(cfg: Any, name: str) -> None:
    check(getattr(cfg, name) >= 1, f"train.batching.{name}", f"{getattr(cfg, name)} must be >= 1")


def _check_chunks(cfg: Any) -> None:
    check(
        cfg.small_batch_size is None or (cfg.small_batch_size >= 1 and cfg.batch_size % cfg.small_batch_size == 0),
        "train.batching.small_batch_size",
        f"{cfg.small_batch_size} must divide train.batching.batch_size ({cfg.batch_size}) or be none",
    )


@dataclass(frozen=True)
class BPTTConfig(EvalBatchSizes):
    """Contiguous streams read in BPTT windows, the state carried (the LSTM papers')."""

    kind: str = kind_field("bptt", "batch_size contiguous streams, the state carried; the LSTM papers'")
    batch_size: int = option(32, "training streams per batch")
    small_batch_size: int | None = option(
        None,
        "gradient accumulation: streams per forward/backward chunk, each with its own carried state, one step per "
        "batch (none: batch_size; the MoS code's small_batch_size)",
    )
    bptt: int = option(35, "base BPTT length (also the window of validation)")
    variable_bptt: bool = option(True, "sample the BPTT length per batch (AWD-LSTM 4.1); false: always bptt")
    bptt_p: float = option(0.95, "probability of the full base length; otherwise half of it")
    bptt_std: float = option(5.0, "standard deviation of the sampled length around the base")
    bptt_min: int = option(5, "shortest sampled BPTT length")
    bptt_max: int | None = option(None, "longest sampled BPTT length (none: no cap)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "bptt", "bptt_min"):
            _at_least_one(self, name)
        _check_chunks(self)
        check(
            self.bptt_max is None or self.bptt_max >= self.bptt_min,
            "train.batching.bptt_max",
            "must be >= train.batching.bptt_min or none",
        )
        check(0.0 <= self.bptt_p <= 1.0, "train.batching.bptt_p", f"{self.bptt_p} must be in [0, 1]")
        check(self.bptt_std >= 0, "train.batching.bptt_std", f"{self.bptt_std} must be >= 0")


@dataclass(frozen=True)
class BlocksConfig(EvalBatchSizes):
    """Shuffled blocks of contiguous tokens, each read from scratch (Baevski & Auli 4.3)."""

    kind: str = kind_field(
        "blocks", "shuffled blocks of block_size tokens, each read from scratch (Baevski & Auli 4.3, WikiText-103)"
    )
    batch_size: int = option(32, "training blocks per batch")
    small_batch_size: int | None = option(
        None, "gradient accumulation: blocks per forward/backward chunk, one step per batch (none: batch_size)"
    )
    block_size: int = option(
        512, "tokens per block, in training and evaluation (Baevski & Auli 4.3 and Table 5: 512, 2048, 3072)"
    )
    update_freq: int = option(
        1, "batches accumulated into each optimizer step (fairseq's update frequency; Baevski & Auli 4.3)"
    )
    eval_context: int = option(
        0,
        "evaluation windows of block_size tokens whose first eval_context only give context (Baevski & Auli Table "
        "5: 480, 1536, 2560)",
    )
    eval_whole_sentences: bool = option(
        True, "the scored part of an evaluation window ends at a sentence end (<eos>) when one falls inside it"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "block_size", "update_freq"):
            _at_least_one(self, name)
        _check_chunks(self)
        check(
            self.small_batch_size is None or self.update_freq == 1,
            "train.batching.small_batch_size",
            "cuts one batch of equal rows into chunks; with train.batching.update_freq > 1 set it to none "
            "(update_freq accumulates)",
        )
        check(
            0 <= self.eval_context < self.block_size,
            "train.batching.eval_context",
            f"{self.eval_context} must be >= 0 and smaller than train.batching.block_size ({self.block_size}): the "
            "context is part of each evaluation block",
        )


@dataclass(frozen=True)
class SentencesConfig(EvalBatchSizes):
    """Single sentences grouped by length (Baevski & Auli's billion word batching)."""

    kind: str = kind_field(
        "sentences", "single sentences, similar lengths grouped up to max_tokens a batch (billion word)"
    )
    max_tokens: int = option(
        4096,
        "tokens per batch, padding included, in training and evaluation (Baevski & Auli 4.3: B = 4096 per GPU on "
        "WikiText-103, 2048 on billion word)",
    )
    update_freq: int = option(
        1, "batches accumulated into each optimizer step (fairseq's update frequency; Baevski & Auli 4.3)"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_tokens", "update_freq"):
            _at_least_one(self, name)


class StreamBatches:
    """``train.batching=bptt``: see :class:`BPTTConfig` and the module docstring."""

    Config = BPTTConfig
    carries_state = True

    @staticmethod
    def context(cfg: BPTTConfig) -> int:
        """The longest span of tokens the model reads at once in training (a BPTT window)."""
        return cfg.bptt

    @staticmethod
    def reading(cfg: BPTTConfig, split: str, eos_id: int) -> Reading:
        return Reading(cfg.batch_size_for(split), cfg.bptt)

    @staticmethod
    def eval_block(cfg: BPTTConfig) -> int:
        return EVAL_BLOCK

    def __init__(
        self, ids: Tensor, cfg: BPTTConfig, seed: int, device: torch.device, eos_id: int, shard: tuple[int, int]
    ) -> None:
        self.cfg = cfg
        self.streams = cfg.batch_size
        """the streams whose state the trainer carries"""
        self.small_batch_size = cfg.small_batch_size
        _require_shares(cfg.batch_size, shard[1], "train.batching.batch_size", "streams")
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
    """Batches read from scratch in a per-epoch shuffled order, ``update_freq`` per step."""

    carries_state = False
    streams = None
    rng = None
    small_batch_size: int | None = None
    plan: BlockPlan | SentencePlan

    def __init__(self, update_freq: int, part: tuple[int, int] = (0, 1)) -> None:
        self.update_freq = update_freq
        per_process = update_freq // part[1]
        self.reads = range(part[0] * per_process, (part[0] + 1) * per_process)
        """which of a step's ``update_freq`` batches this process reads (all of them, except for
        sentences under data parallelism)"""

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
    """``train.batching=blocks``: see :class:`BlocksConfig` and the module docstring."""

    Config = BlocksConfig

    @staticmethod
    def context(cfg: BlocksConfig) -> int:
        return cfg.block_size

    @staticmethod
    def reading(cfg: BlocksConfig, split: str, eos_id: int) -> Reading:
        ends = eos_id if cfg.eval_whole_sentences else None
        return Reading(cfg.batch_size_for(split), EVAL_BPTT, cfg.block_size, cfg.eval_context, ends)

    @staticmethod
    def eval_block(cfg: BlocksConfig) -> int:
        return cfg.block_size

    def __init__(
        self, ids: Tensor, cfg: BlocksConfig, seed: int, device: torch.device, eos_id: int, shard: tuple[int, int]
    ) -> None:
        super().__init__(cfg.update_freq)
        self.small_batch_size = cfg.small_batch_size
        self.rank, self.world = shard
        _require_shares(cfg.batch_size, self.world, "train.batching.batch_size", "blocks")
        self.plan = BlockPlan(ids, cfg.block_size, cfg.batch_size // self.world, seed).to(device)
        if self.plan.batches < self.world:
            raise ReglmError(
                f"the training split holds {self.plan.n_blocks} blocks of {cfg.block_size} tokens, fewer than a "
                f"batch of {cfg.batch_size}; "
                "lower train.batching.block_size or train.batching.batch_size"
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
    """``train.batching=sentences``: see :class:`SentencesConfig` and the module docstring."""

    Config = SentencesConfig

    @staticmethod
    def context(cfg: SentencesConfig) -> int:
        """A sentence longer than the token budget is cut into pieces of the budget."""
        return cfg.max_tokens

    @staticmethod
    def reading(cfg: SentencesConfig, split: str, eos_id: int) -> Reading:
        return Reading(cfg.batch_size_for(split), EVAL_BPTT, sentence_end=eos_id, max_tokens=cfg.max_tokens)

    @staticmethod
    def eval_block(cfg: SentencesConfig) -> int:
        return EVAL_BLOCK

    def __init__(
        self, ids: Tensor, cfg: SentencesConfig, seed: int, device: torch.device, eos_id: int, shard: tuple[int, int]
    ) -> None:
        _require_shares(cfg.update_freq, shard[1], "train.batching.update_freq", "batches of sentences per step")
        super().__init__(cfg.update_freq, shard)
        self.plan = SentencePlan(ids, eos_id, cfg.max_tokens, seed=seed).to(device)
        if self.plan.batches < cfg.update_freq:
            raise ReglmError(
                f"the training split makes {self.plan.batches} batches of at most {cfg.max_tokens} tokens, fewer "
                "than the "
                f"{cfg.update_freq} of one step; lower train.batching.update_freq or train.batching.max_tokens"
            )


BATCHINGS: dict[str, Any] = {"bptt": StreamBatches, "blocks": BlockBatches, "sentences": SentenceBatches}
"""The batching registry (:data:`~reglm.config.kinds.FAMILIES` ``batching``)."""


def training_batches(
    ids: Tensor, cfg: Any, seed: int, device: torch.device, eos_id: int, shard: tuple[int, int] = (0, 1)
) -> Any:
    """The batches of the kind ``cfg`` (a batching config) names; ``shard``: this process's share (rank, world size)."""
    return BATCHINGS[cfg.kind](ids, cfg, seed, device, eos_id, shard)


def trained_context(cfg: Any) -> int:
    """The longest span of tokens a model trained with the batching ``cfg`` read at once: what a
    stateless model may attend over when it scores a longer text (in windows of this many tokens)."""
    return BATCHINGS[cfg.kind].context(cfg)


def eval_reading(cfg: Any, split: str, eos_id: int) -> Reading:
    """How validation (``split="valid"``) and the final scores read a split: as the run trains
    (streams, blocks with ``eval_context``, or sentences), with that split's batch size."""
    return BATCHINGS[cfg.kind].reading(cfg, split, eos_id)


def eval_block(cfg: Any) -> int:
    """The block length an evaluation mode that reads blocks only uses for a run trained with ``cfg``."""
    return BATCHINGS[cfg.kind].eval_block(cfg)


def _require_shares(count: int, world: int, option: str, what: str) -> None:
    if count % world:
        raise ReglmError(
            f"{option}={count} {what} cannot be split evenly over {world} processes: the config states the global "
            "batch and each "
            f"process reads 1/{world} of it; set {option} to a multiple of {world}, or start another number of "
            "processes"
        )
