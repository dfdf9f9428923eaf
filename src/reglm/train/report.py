"""What a training run reports as it goes: an epoch's progress bar, its ``step`` events in
``metrics.jsonl`` at every ``train.log.interval`` steps, the progress lines with the ETA of the
whole run at this session's pace, each epoch's ``epoch`` event and line, and the scores of the model a run starts from.

A run prints a progress line when it shows no progress bar (no terminal): at every log interval,
after the first steps, and at least every :data:`reglm.progress.INTERVAL` seconds. The ETA counts
the planned epochs of the stage (or the steps left to ``train.max_steps``, whichever ends it
first) and, in the main stage, ``train.finetune.epochs`` more when fine-tuning follows.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from reglm.evaluate.perplexity import perplexity
from reglm.progress import Pace, clock

if TYPE_CHECKING:
    from reglm.train.trainer import Trainer


def epochs_done(trainer: Trainer) -> float:
    """Epochs of the current stage done, the current one in part."""
    return trainer.epoch + trainer.position / max(trainer.batches.total, 1)


class RunPace:
    """The pace of this session's steps since a stage (or the session) began."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.pace = Pace()
        self.since = (epochs_done(trainer), trainer.step)
        """the stage's epochs done and the step when the pace started"""

    def due(self, force: bool) -> bool:
        """Whether a progress line is due now (:meth:`reglm.progress.Pace.due`)."""
        return self.pace.due(self.trainer.step - self.since[1], self.eta, force=force)

    def eta(self) -> float:
        """Seconds until the run ends, at this session's pace (validation included); an upper
        bound in the main stage of a run that fine-tunes (fine-tuning may stop earlier)."""
        t = self.trainer
        cfg = t.cfg
        done, (start, start_step) = epochs_done(t), self.since
        if done <= start or t.step <= start_step:
            return math.inf
        per_epoch = self.pace.elapsed() / (done - start)
        if t.stage == "finetune":
            return max(cfg.finetune.epochs - done, 0.0) * per_epoch
        left = max(cfg.epochs - done, 0.0)
        if cfg.max_steps is not None:
            left = min(left, max(cfg.max_steps - t.step, 0) * (done - start) / (t.step - start_step))
        return (left + (cfg.finetune.epochs if cfg.finetune.enabled else 0)) * per_epoch

    def line(self, interval: tuple[float, float] | None, lr: float, steps_per_s: float) -> str:
        """The progress line: where in the epoch, steps/s since the last line, the last log
        interval's tokens/s and loss (``-`` before the first: reading the loss between log
        intervals would sync the host, and every process of a distributed run), the rate and
        the ETA of the whole run."""
        t = self.trainer
        total = t.batches.total
        rate, loss = (f"{interval[1]:9,.0f}", f"{interval[0]:7.4f}") if interval else (f"{'-':>9s}", f"{'-':>7s}")
        ppl = f"{perplexity(interval[0]):9.2f}" if interval else f"{'-':>9s}"
        return (
            f"| {t.stage} | epoch {t.epoch + 1:3d} | step {t.step:7d} | {t.position / max(total, 1):4.0%} of epoch | "
            f"{steps_per_s:6.3g} steps/s | {rate} tok/s | loss {loss} | ppl {ppl} | lr {lr:.4g} | "
            f"run ETA {clock(self.eta())}"
        )


class EpochProgress:
    """One epoch's progress of ``trainer``: the bar (on a terminal), the ``step`` event logged at
    every log interval (the interval's mean loss and tokens/s), and the progress line when no bar
    is shown (:meth:`RunPace.line`)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = t = trainer
        self.bar = tqdm(
            total=t.batches.total,
            initial=t.position,
            disable=not t.progress,
            unit="tok/stream" if t.batches.carries_state else "batch",
            leave=False,
            desc=f"{t.stage} epoch {t.epoch + 1}",
        )
        self.window = (t.epoch_nll, t.epoch_tokens, time.perf_counter())
        """the epoch's loss sum and tokens, and the time, when the log interval began"""
        self.line = (t.step, time.perf_counter())
        """the step and the time of the last progress line"""

    def after_step(self, advance: int, lr: float) -> None:
        """After a step that advanced the epoch by ``advance`` at rate ``lr``."""
        t = self.trainer
        self.bar.update(advance)
        logged = t.step % t.cfg.log.interval == 0
        if logged:
            t.flush()
            window_nll, window_tokens, window_start = self.window
            tokens = t.epoch_tokens - window_tokens
            mean = (t.epoch_nll - window_nll) / max(tokens, 1)
            elapsed = time.perf_counter() - window_start
            t.metrics.log(
                event="step",
                stage=t.stage,
                epoch=t.epoch + 1,
                step=t.step,
                lr=lr,
                loss=mean,
                ppl=perplexity(mean),
                tokens_per_s=tokens / max(elapsed, 1e-9),
                averaging=t.averaging.active,
            )
            self.bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{perplexity(mean):.1f}", run_eta=clock(t.pace.eta()))
            t.last_interval = (mean, tokens / max(elapsed, 1e-9))
            self.window = (t.epoch_nll, t.epoch_tokens, time.perf_counter())
        due = t.pace.due(force=logged)
        if not t.progress and t.dist.is_main and due:
            line_step, line_start = self.line
            steps_per_s = (t.step - line_step) / max(time.perf_counter() - line_start, 1e-9)
            t.say(t.pace.line(t.last_interval, lr, steps_per_s))
            self.line = (t.step, time.perf_counter())

    def close(self) -> None:
        self.bar.close()


def report_epoch(
    trainer: Trainer, val: Any, train_loss: float, lr: float, improved: bool, advsoft: bool, noise_std: float
) -> None:
    """The ``epoch`` event of ``metrics.jsonl`` and the epoch's line, after validation ``val``
    (:class:`~reglm.objectives.objective.ObjectiveEval`) of the epoch just counted."""
    t = trainer
    valid = {f"valid_{name}": value for name, value in val.metrics.items() if name != "tokens"}
    averaging = t.averaging.active
    t.metrics.log(
        event="epoch",
        stage=t.stage,
        epoch=t.epoch,
        step=t.step,
        train_loss=train_loss,
        train_ppl=perplexity(train_loss),
        **valid,
        lr=lr,
        averaging=averaging,
        best=improved,
        advsoft=advsoft,
        input_noise=noise_std,
    )
    shown = " | ".join(
        f"valid {name} {value:9.4g}" for name, value in val.metrics.items() if name not in ("tokens", "words")
    )
    t.say(
        f"| {t.stage} | epoch {t.epoch:3d} | step {t.step:7d} | train loss {train_loss:7.4f} | {shown}"
        + (" | averaging" if averaging else "")
        + (" | best" if improved else "")
    )


def report_initial(trainer: Trainer, val: Any) -> None:
    """The ``initial`` event and line: the validation scores ``val`` of the model a run starts
    from (Table 2's "Initial model" row of Popov & Kudinov)."""
    trainer.metrics.log(
        event="initial", step=0, **{f"valid_{name}": value for name, value in val.metrics.items() if name != "tokens"}
    )
    shown = ", ".join(
        f"valid {name} {value:.4g}" for name, value in val.metrics.items() if name not in ("tokens", "words")
    )
    trainer.say(f"initial model: {shown}")
