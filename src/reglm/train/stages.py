"""What the stage and epoch of a run decide, read by the trainer (:mod:`reglm.train.trainer`).

As an epoch runs: whether AdvSoft is on and the input-noise std, from the schedules
(:mod:`reglm.optim.schedules`). At its end, once the weights evaluation sees (:func:`eval_weights`:
the average once averaging runs) have a finite validation score (:func:`close_epoch`): the
``epoch`` event and line, ``best/`` when the score improved, ``last/``, the plateau of the
learning-rate schedule, the averaging policy's trigger in the main stage and its stop in the
fine-tuning stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from reglm.modeldir import save_model_dir
from reglm.objectives.objective import ObjectiveEval
from reglm.optim.schedules import advsoft_on, annealed_std
from reglm.train.report import report_epoch

if TYPE_CHECKING:
    from reglm.train.trainer import Trainer


def advsoft_now(trainer: Trainer) -> bool:
    """Whether the adversarial softmax perturbs the output in the current stage and epoch."""
    advsoft = trainer.config.model.output.advsoft
    return advsoft is not None and advsoft_on(
        advsoft.enabled, trainer.cfg.advsoft_stop_epoch, trainer.cfg.finetune.advsoft, trainer.stage, trainer.epoch
    )


def input_noise_now(trainer: Trainer) -> float:
    """The input-noise std of the current stage and epoch."""
    cfg = trainer.cfg
    if trainer.stage == "finetune":
        return cfg.finetune.input_noise_std
    noise = cfg.input_noise
    return annealed_std(noise.std, noise.anneal, trainer.epoch, noise.epochs)


def eval_weights(trainer: Trainer) -> torch.nn.Module:
    """The model evaluation sees: the average once averaging runs, else the iterate."""
    if trainer.averaging.active:
        trainer.eval_model.load_state_dict(trainer.averaging.averaged_state(trainer.model))
    else:
        trainer.eval_model.load_state_dict(trainer.model.state_dict())
    return trainer.eval_model


def close_epoch(trainer: Trainer, val: ObjectiveEval, eval_model: torch.nn.Module) -> None:
    """Count the epoch and act on its validation ``val`` of ``eval_model`` (finite, checked by
    the trainer): report it, write ``best/`` (when it improved) and ``last/``, let the schedule
    see a plateau and the averaging policy trigger (main stage) or stop the stage (fine-tuning)."""
    t = trainer
    train_loss = t.epoch_nll / max(t.epoch_tokens, 1)
    adversarial, noise_std = advsoft_now(t), input_noise_now(t)
    lr = t.schedule.rate(t.stage, t.epoch, t.step)
    t.epoch += 1
    improved = val.selection < t.best_val
    report_epoch(t, val, train_loss, lr, improved, adversarial, noise_std)
    valid = {f"valid_{name}": value for name, value in val.metrics.items() if name != "tokens"}
    info = {"stage": t.stage, "epoch": t.epoch, "step": t.step, **valid, "averaged": t.averaging.active}
    if improved:
        t.best_val = val.selection
        t.dist.on_main(lambda: save_model_dir(t.run_dir / "best", eval_model, t.config, t.vocab, info))
    if t.schedule.epoch_end(improved, val.selection):
        rate = t.schedule.rate(t.stage, t.epoch, t.step)
        t.metrics.log(event="plateau", stage=t.stage, epoch=t.epoch, step=t.step, lr=rate)
        ends = "; the stage ends (train.schedule.plateau_stop)" if t.schedule.exhausted(t.stage) else ""
        t.say(f"validation stalled: learning rate -> {rate:.4g}{ends}")
    t.dist.on_main(lambda: save_model_dir(t.run_dir / "last", eval_model, t.config, t.vocab, info))
    if t.stage == "main":
        if t.averaging.main_epoch_end(val.selection, t.model.parameters()):
            t.metrics.log(event="trigger", stage=t.stage, epoch=t.epoch, step=t.step, valid_loss=val.selection)
            t.say(f"NT-ASGD: averaging starts after epoch {t.epoch} (step {t.step})")
    elif t.stage == "finetune" and t.averaging.finetune_epoch_end(val.selection):
        t.metrics.log(event="finetune_stop", epoch=t.epoch, step=t.step, valid_loss=val.selection)
        t.say(f"fine-tuning stops after epoch {t.epoch}: the non-monotone criterion fired")
        t.stage = "done"
