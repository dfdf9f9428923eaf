"""The trainer: a run's stages, epochs and checkpoints, and exact resume.

Stages (AWD-LSTM, section 5):

``main``
    ``train.epochs`` epochs. The averaging policy (``train.averaging``; NT-ASGD's trigger checked
    on the validation score after every epoch) may start averaging; from then on every
    evaluation, ``best/`` and ``last/`` use the averaged weights.
``finetune`` (``train.finetune.enabled=true``)
    ASGD restarted with T = 0 from ``best/``: averaging from the hot-started point; the run stops
    when the same non-monotone criterion fires (or after ``train.finetune.epochs``).
``done``
    ``best/`` is scored on validation and test and ``results.json`` is written
    (:mod:`reglm.train.results`).

The pieces, one job each: the batching (:mod:`reglm.data.batchings`) gives every step's windows;
the step engine (:mod:`reglm.train.engine`) takes one optimizer step on them; the schedules
(:mod:`reglm.optim.schedules`) give the learning rate, AdvSoft switch and input-noise std; the
optimizer, the averaging policy and the objective (:mod:`reglm.objectives.objective`, the loss and how
a split is scored) are components of the config; :mod:`reglm.train.stages` says what the stage
and epoch decide (AdvSoft, input noise, what an epoch's validation score does);
:mod:`reglm.train.run` starts and resumes runs. This module owns the order of things and the
checkpoints.

Resume: ``state.pt`` (:mod:`reglm.train.run_state`) is written before the first step, at every
epoch end, every ``train.checkpoint_interval`` steps and when a stop is requested (the command
line requests one on SIGINT/SIGTERM; as a library, the trainer lets ``KeyboardInterrupt`` through
unless it is given a :class:`StopRequest`). What the run reports as it goes is :mod:`reglm.train.report`.

Divergence: a non-finite training loss (read at log intervals and before every checkpoint),
validation score or parameter stops the run with :class:`TrainingDiverged` before anything is
written; every checkpoint on disk is finite.

Data parallelism (``torchrun``; :mod:`reglm.train.distributed`, the ``dist`` the trainer is
given): every rank runs this loop in lock-step on its share of the batches; rank 0 alone writes,
logs and evaluates (``dist.on_main`` / ``dist.from_main``), the loss sums and the stop requests
are all-reduced, and ``state.pt`` gathers every rank's part. With one process every hook is the
identity.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from reglm.config import RunConfig
from reglm.config.kinds import component_class
from reglm.data import Corpus, Vocab
from reglm.data.batchings import eval_reading, training_batches
from reglm.devices import check_model_size
from reglm.encoders.base import State
from reglm.errors import ReglmError, TrainingDiverged, TrainingInterrupted
from reglm.evaluate.perplexity import Reading
from reglm.io import write_json
from reglm.metrics import MetricsLog
from reglm.modeldir import load_model_dir
from reglm.models import LanguageModel
from reglm.objectives.activation_reg import ActivationReg, TemporalActivationReg
from reglm.objectives.objective import ObjectiveEval, make_objective
from reglm.progress import say
from reglm.rundir import (
    CONFIG_FILE,
    ENVIRONMENT_FILE,
    METRICS_FILE,
    STATE_FILE,
    VOCAB_FILE,
    RunLock,
    claim_new,
    describe_previous,
)
from reglm.train.checkpoint import save_state
from reglm.train.distributed import SINGLE, SilentLog, SingleProcess
from reglm.train.engine import StepEngine
from reglm.train.report import EpochProgress, RunPace, report_initial
from reglm.train.results import finish, record_main_stage
from reglm.train.run_state import restore, run_state
from reglm.train.setup import session_record
from reglm.train.stages import advsoft_now, close_epoch, eval_weights, input_noise_now


class StopRequest:
    """A stop the trainer honours at the end of the current step: it saves a checkpoint and raises
    :class:`TrainingInterrupted`. The command line sets it from its SIGINT/SIGTERM handlers.
    While :attr:`immediate` is set (the final evaluation of a run that is complete, which has
    nothing to save), a signal interrupts at once (``KeyboardInterrupt``)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.immediate = False

    def request(self, signum: int) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


StepHook = Callable[["Trainer"], None]


class Trainer:
    """Owns the model, optimizer, averaging, schedule and position of one run directory."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        corpus: Corpus,
        progress: bool | None = None,
        stop: StopRequest | None = None,
        lock: RunLock | None = None,
        dist: SingleProcess = SINGLE,
    ):
        self.config = config
        self.cfg = cfg = config.train
        self.run_dir = Path(run_dir)
        self.corpus = corpus
        self.vocab: Vocab = corpus.vocab
        self.dist = dist
        """the processes of the run (:mod:`reglm.train.distributed`): rank 0 alone writes, logs and evaluates"""
        self.device = dist.device(cfg.device)
        # a bar only on a terminal (progress=False: none); a log file or a pipe gets progress lines
        self.progress = progress is not False and sys.stderr.isatty() and dist.is_main
        self.stop = stop
        self.lock = lock
        check_model_size(config, len(self.vocab), self.device)
        for split, batch_size, option in (
            ("valid", cfg.batching.eval_batch_size, "train.batching.eval_batch_size"),
            ("test", cfg.batching.test_batch_size, "train.batching.test_batch_size"),
        ):
            ids = getattr(corpus, split)
            if ids.numel() - 1 < batch_size:
                raise ReglmError(
                    f"{option}={batch_size} is too large for the {split} split ({ids.numel()} tokens): each stream "
                    f"needs at least one target; lower {option}"
                )
        torch.manual_seed(config.seed)
        self.model = LanguageModel(config.model, len(self.vocab), self.vocab).to(self.device)
        self.eval_model = LanguageModel(config.model, len(self.vocab), self.vocab).to(self.device)
        dist.seed(config.seed)
        self.batches = training_batches(
            corpus.train, cfg.batching, config.seed, self.device, self.vocab.eos_id, dist.shard
        )
        self.metrics = (
            MetricsLog(self.run_dir / METRICS_FILE, tensorboard=cfg.log.tensorboard) if dist.is_main else SilentLog()
        )
        self.objective = make_objective(config, self.vocab, self.device)
        terms = [*self.objective.terms, ActivationReg(cfg.terms.ar_alpha), TemporalActivationReg(cfg.terms.tar_beta)]
        self.engine = StepEngine(
            self.model,
            self.objective,
            terms,
            self._new_optimizer(),
            self.batches.small_batch_size,
            cfg.clip,
            cfg.sequence_loss,
            parallel=dist,
            autocast=self._autocast,
            compile=cfg.compile,
        )
        self.averaging = component_class("averaging", cfg.averaging, "train.averaging")(cfg.averaging)
        self.schedule = component_class("schedule", cfg.schedule, "train.schedule")(
            cfg.schedule, cfg.optimizer.lr, cfg.finetune.lr
        )
        self.step_hooks: list[StepHook] = []
        """Called with the trainer once the run has started (before its first step) and after every step."""
        self.stage = "main"
        self.epoch = 0
        self.step = 0
        self.position = 0
        self.hidden: State | None = None
        self.epoch_nll = 0.0
        self.epoch_tokens = 0
        self.best_val = math.inf
        self.last_checkpoint: str | None = None
        self.pace = RunPace(self)
        """the pace of this session's steps, for the progress lines (reset when a stage begins)"""
        self.last_interval: tuple[float, float] | None = None
        """the loss and tokens/s of the last log interval of this session, for the progress lines"""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    def _new_optimizer(self) -> torch.optim.Optimizer:
        optimizer = component_class("optimizer", self.cfg.optimizer, "train.optimizer")
        return optimizer.build(self.cfg.optimizer, self.model.parameters())

    # ------------------------------------------------------------------ start, state, stop

    def start(self) -> None:
        """Claim a fresh run directory (:func:`reglm.rundir.claim_new`), write its files, let the
        objective set the starting weights (:meth:`prepare`) and write the first ``state.pt``, so
        the run can be resumed from its first step on."""

        def claim() -> None:
            if self.lock is None:
                self.lock = claim_new(self.run_dir)
                self.report_takeover()
            write_json(self.run_dir / CONFIG_FILE, self.config.to_dict())

        self.dist.on_main(claim)
        self._begin()

    def restart(self) -> None:
        """Start over a claimed run directory whose run never wrote a checkpoint: its
        ``config.json`` stays, the rest is written afresh, as by :meth:`start`."""
        self.say(
            f"{self.run_dir} has no checkpoint yet (it stopped before its first step); starting it over from its "
            f"{CONFIG_FILE}"
        )
        self._begin()

    def _begin(self) -> None:
        def write() -> None:
            self.vocab.save(self.run_dir / VOCAB_FILE)
            write_json(self.run_dir / ENVIRONMENT_FILE, [session_record(self.device, self.corpus) | self.dist.record()])
            self.metrics.truncate(0)

        self.dist.on_main(write)
        self.prepare()
        for hook in self.step_hooks:
            hook(self)
        self.save_checkpoint()

    def prepare(self) -> None:
        """At a fresh start (part of :meth:`start`): let the objective set the starting weights (a
        base model's, for fine-tuning) and, when the run starts from a model, log that model's
        validation scores as the ``initial`` event (Table 2's "Initial model" row of Popov & Kudinov)."""
        self.objective.prepare(self.model)
        if self.objective.initial_model() is not None:
            report_initial(self, self.dist.from_main(lambda: self.score(self.model, "valid")))

    def report_takeover(self) -> None:
        self.say(describe_previous(self.lock) or "" if self.lock is not None else "")

    def close(self) -> None:
        """Close the metrics log and release the run directory."""
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (:func:`~reglm.train.run_state.run_state`)."""
        self.flush()
        return run_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state`` (:func:`~reglm.train.run_state.restore`)."""
        restore(self, state)

    def checkpoint_name(self) -> str:
        return f"{self.run_dir / STATE_FILE} (stage {self.stage}, epoch {self.epoch}, step {self.step})"

    def _diverged(self, what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"{what} at step {self.step} (stage {self.stage}, epoch {self.epoch + 1}); nothing was saved from it. "
            f"Last good checkpoint: {self.last_checkpoint or 'none yet'}. Lower train.lr or train.clip and resume "
            "or restart."
        )

    def _require_finite(self, module: torch.nn.Module) -> None:
        """Divergence when a parameter of ``module`` is not finite (one host sync)."""
        if not bool(torch.stack([p.detach().isfinite().all() for p in module.parameters()]).all()):
            raise self._diverged("a parameter became NaN or infinite")

    def flush(self) -> None:
        """Read the engine's loss sums (one host sync) into the epoch's; a non-finite loss is divergence."""
        nll, tokens, finite = self.dist.sum_losses(*self.engine.flush())
        if not finite:
            raise self._diverged("the training loss became NaN or infinite (at or before this step)")
        self.epoch_nll += nll
        self.epoch_tokens += tokens

    def save_checkpoint(self) -> None:
        state = self.state_dict()
        self._require_finite(self.model)
        self.dist.on_main(lambda: save_state(self.run_dir / STATE_FILE, state))
        self.last_checkpoint = self.checkpoint_name()

    def _interrupt(self) -> None:
        self.save_checkpoint()
        assert self.stop is not None and self.stop.signum is not None
        raise TrainingInterrupted(self.stop.signum, self.run_dir, self.step)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train until the run is done; returns the final results. The run directory is released
        when this returns or raises."""
        try:
            self._restart_pace()
            while self.stage != "done":
                main_over = self.epoch >= self.cfg.epochs or self._out_of_steps() or self.schedule.exhausted(self.stage)
                if self.stage == "main" and main_over:
                    self._begin_finetune() if self.cfg.finetune.enabled else self._set_stage("done")
                    continue
                if self.stage == "finetune" and self.epoch >= self.cfg.finetune.epochs:
                    self._set_stage("done")
                    continue
                self._train_epoch()
                self._end_epoch()
            if self.stop is not None:
                self.stop.immediate = True
            try:
                return self.dist.from_main(lambda: finish(self))
            finally:
                if self.stop is not None:
                    self.stop.immediate = False
        finally:
            self.close()

    def _set_stage(self, stage: str) -> None:
        self.stage = stage
        self.save_checkpoint()

    def _begin_finetune(self) -> None:
        """ASGD with T = 0, hot-started from the best model (AWD-LSTM section 5); that model's
        scores are recorded first (:func:`~reglm.train.results.record_main_stage`)."""
        self.dist.on_main(lambda: record_main_stage(self))

        def hot_start() -> None:
            best, _, _ = load_model_dir(self.run_dir / "best", self.device)
            self.model.load_state_dict(best.state_dict())

        self.dist.on_main(hot_start)
        self.dist.broadcast_module(self.model)
        self.engine.replace_optimizer(self._new_optimizer())
        self.averaging.begin_finetune(self.model.parameters())
        self.stage, self.epoch = "finetune", 0
        self._restart_pace()
        self.metrics.log(event="stage", stage="finetune", step=self.step)
        self.say(f"fine-tuning: ASGD restarted with T=0 from {self.run_dir / 'best'}")
        self.save_checkpoint()

    def _autocast(self) -> Any:
        """The forward pass's precision (``train.precision``): bf16 autocast on CUDA only; a CPU
        without bf16 units runs bf16 matrix products many times slower than fp32, so a CPU run of
        a bf16 preset computes in fp32."""
        if self.cfg.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _out_of_steps(self) -> bool:
        return self.stage == "main" and self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _train_epoch(self) -> None:
        cfg, model, batches = self.cfg, self.model, self.batches
        model.train()
        if not batches.carries_state:
            self.hidden = None
        elif self.hidden is None:
            self.hidden = model.init_state(self.dist.share(batches.streams), device=self.device)
        adversarial, noise_std = advsoft_now(self), input_noise_now(self)
        progress = EpochProgress(self)
        while not batches.done(self.position) and not self._out_of_steps():
            window, advance, factor = batches.next(self.position, self.epoch)
            lr = self.schedule.rate(self.stage, self.epoch, self.step) * factor
            state = self.engine.step(window, self.hidden, lr, adversarial, noise_std)
            self.hidden = state if batches.carries_state else None
            self.averaging.update(model.parameters())
            self.objective.end_step()
            self.position += advance
            self.step += 1
            progress.after_step(advance, lr)
            for hook in self.step_hooks:
                hook(self)
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                self.save_checkpoint()
            if self._stop_requested():
                progress.close()
                self._interrupt()
        progress.close()
        self.flush()

    def _restart_pace(self) -> None:
        self.pace = RunPace(self)

    def reading(self, split: str) -> Reading:
        """How validation (``valid``) and the final scores read a split (:func:`~reglm.data.batchings.eval_reading`)."""
        return eval_reading(self.cfg.batching, split, self.vocab.eos_id)

    def score(self, model: torch.nn.Module, split: str) -> ObjectiveEval:
        ids, word_ends = getattr(self.corpus, split), self.corpus.split_word_ends(split)
        return self.objective.score(model, ids, self.reading(split), self.device, self.dist.is_main, split, word_ends)

    def _end_epoch(self) -> None:
        eval_model = eval_weights(self)
        val = self.dist.from_main(lambda: self.score(eval_model, "valid"))
        if not math.isfinite(val.selection):
            raise self._diverged(f"the validation score became {val.selection}")
        self._require_finite(eval_model)
        close_epoch(self, val, eval_model)
        self.position, self.hidden, self.epoch_nll, self.epoch_tokens = 0, None, 0.0, 0
        self.objective.reset()
        self.save_checkpoint()
        if self._stop_requested():
            self._interrupt()

    def _stop_requested(self) -> bool:
        """Whether a stop was requested on any rank: the ranks vote after every step, so that all
        checkpoint and stop at the same one, a rank without a signal taking the others'."""
        if self.stop is None:
            return False
        signum = self.dist.max(self.stop.signum or 0)
        if signum and not self.stop.requested:
            self.stop.request(signum)
        return signum != 0

    def say(self, text: str) -> None:
        if self.dist.is_main and text:
            say(text)
