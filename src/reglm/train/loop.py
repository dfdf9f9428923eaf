"""The training loop: SGD / NT-ASGD over variable-length BPTT windows, fine-tuning, exact resume.

Stages (AWD-LSTM, section 5):

``main``
    ``train.epochs`` epochs of SGD. With ``train.optimizer=ntasgd`` the non-monotone trigger
    is checked on the validation loss after every epoch (logging interval L = one epoch);
    once it fires, the iterates are averaged from then on and every evaluation, ``best/`` and
    ``last/`` use the averaged weights.
``finetune`` (``train.finetune=true``)
    ASGD restarted with T = 0 from ``best/``: averaging starts at the hot-started point and the
    run stops when the same non-monotone criterion fires (or after ``train.finetune_epochs``).
``done``
    ``best/`` is scored on validation and test (``train.test_batch_size``) and ``results.json``
    is written.

Each step: sample the BPTT length, rescale the learning rate by ``seq_len / bptt``, loss =
mean token NLL + the output layer's penalty (DOC's, on the mixture weights; 0 otherwise) + AR +
TAR, clip the global gradient norm, SGD step (with weight decay), update the average. The hidden
state is carried across batches (detached) and reset each epoch.
The token NLL is the adversarial softmax's while AdvSoft is on (``model.advsoft``; off after
``train.advsoft_stop_epoch`` and, unless ``train.advsoft_finetune``, in fine-tuning), and the
embedded input gets Gaussian noise per ``train.input_noise_*``. The logged training perplexity
is that of the training objective (dropout, noise and AdvSoft included); validation is clean.

Gradient accumulation (``train.small_batch_size``, the MoS recipes'): the batch's streams are
split into consecutive chunks of ``small_batch_size``; each chunk runs forward and backward on
its own (its own dropout masks; its carried state is its slice of the batch's) with its loss
scaled by ``small_batch_size / batch_size``, and one clipped SGD step follows per batch. With
dropout off the summed gradient equals the full batch's, the DOC penalty aside: it is computed
per chunk, as in the authors' code.

Resume: ``state.pt`` is written before the first step, at every epoch end, every
``train.checkpoint_interval`` steps and when a stop is requested (the command line requests one on
SIGINT/SIGTERM; as a library, the trainer lets ``KeyboardInterrupt`` through unless it is given a
:class:`StopRequest`). It holds the weights, the average, the trigger log, the stage, epoch,
step, the position in the training stream, the carried hidden state (every chunk's, concatenated
along the stream axis), the epoch's running loss and every RNG state, so on CPU a resumed run
ends with the same weights, bit for bit, as an uninterrupted one. A run directory is claimed
exclusively for the life of the process (:mod:`reglm.rundir`).

Divergence: a non-finite training loss, validation score or parameter stops the run with
:class:`TrainingDiverged` before anything is written; every checkpoint on disk is finite.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from reglm.config import RunConfig, load_config_file
from reglm.data import Corpus, Vocab, resolve
from reglm.data.windows import StreamPlan
from reglm.encoders.base import State, concat_states, detach_state, select_streams, state_dict_of
from reglm.errors import ReglmError, TrainingDiverged, TrainingInterrupted
from reglm.evaluate.perplexity import EvalResult, evaluate, perplexity
from reglm.io import environment, write_json
from reglm.models import LanguageModel, count_parameters
from reglm.rundir import CONFIG_FILE, ENVIRONMENT_FILE, RunLock, claim_existing, claim_new, describe_previous
from reglm.objectives.activation_reg import activation_reg, temporal_activation_reg
from reglm.train.checkpoint import STATE_FILE, VOCAB_FILE, load_model_dir, load_state, save_model_dir, save_state
from reglm.train.metrics import MetricsLog
from reglm.train.ntasgd import NonMonotoneTrigger, ParameterAverager
from reglm.train.objective import ObjectiveEval, make_objective
from reglm.train.schedules import annealed_std, sample_bptt, scaled_lr

TRAINING_BYTES_PER_PARAMETER = 24
"""What training holds per parameter, roughly: the weights, their gradient, the evaluation copy,
the optimizer's state and the float64 average (4 + 4 + 4 + 4 + 8 bytes)."""


class StopRequest:
    """A stop the trainer honours at the end of the current step: it saves a checkpoint and raises
    :class:`TrainingInterrupted`. The command line sets it from its SIGINT/SIGTERM handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def request(self, signum: int) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ReglmError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def load_corpus(config: RunConfig) -> Corpus:
    d = config.data
    return resolve(d.name, data_dir=d.data_dir, min_freq=d.min_freq, max_vocab=d.max_vocab, synthetic_seed=d.synthetic_seed, synthetic_sentences=d.synthetic_sentences)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on ``device`` (the machine's RAM for the CPU), or None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_model_size(config: RunConfig, vocab_size: int, device: torch.device) -> int:
    """The model's parameter count, counted without allocating anything; a model whose training
    would not fit in ``device``'s memory is a ReglmError naming the sizes to lower."""
    fix = "lower model.hidden_size, model.emb_size or model.num_layers (or data.max_vocab)"
    try:
        n = count_parameters(config.model, vocab_size)
    except RuntimeError:
        raise ReglmError(f"the model is too large to build (its tensor sizes overflow); {fix}") from None
    need, have = n * TRAINING_BYTES_PER_PARAMETER, device_memory(device)
    if have is not None and need > have:
        raise ReglmError(
            f"the model has {n:,} parameters: training needs about {need / 2**30:,.1f} GiB, more than the "
            f"{have / 2**30:,.1f} GiB of {device}; {fix}"
        )
    return n


def _finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of ``module`` is finite (one host sync)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in module.parameters()]).all())


StepHook = Callable[["Trainer"], None]


class Trainer:
    """Owns the model, optimizer, average, trigger and position of one run directory."""

    def __init__(
        self, config: RunConfig, run_dir: Path, corpus: Corpus, progress: bool | None = None, stop: StopRequest | None = None, lock: RunLock | None = None,
    ):
        self.config = config
        self.cfg = config.train
        self.run_dir = Path(run_dir)
        self.corpus = corpus
        self.vocab: Vocab = corpus.vocab
        self.device = resolve_device(self.cfg.device)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.stop = stop
        self.lock = lock
        check_model_size(config, len(self.vocab), self.device)
        for split, batch_size, option in (("valid", self.cfg.eval_batch_size, "train.eval_batch_size"), ("test", self.cfg.test_batch_size, "train.test_batch_size")):
            ids = getattr(corpus, split)
            if ids.numel() - 1 < batch_size:
                raise ReglmError(f"{option}={batch_size} is too large for the {split} split ({ids.numel()} tokens): each stream needs at least one target; lower {option}")
        torch.manual_seed(config.seed)
        self.bptt_rng = torch.Generator().manual_seed(config.seed)
        self.model = LanguageModel(config.model, len(self.vocab)).to(self.device)
        self.eval_model = LanguageModel(config.model, len(self.vocab)).to(self.device)
        self.optimizer = self._new_optimizer()
        self.averager = ParameterAverager()
        self.trigger = NonMonotoneTrigger(self.cfg.nonmono, self.cfg.trigger)
        self.train_plan = StreamPlan(corpus.train, self.cfg.batch_size, "trim").to(self.device)
        chunk = self.cfg.small_batch_size or self.cfg.batch_size
        self.chunks = [slice(start, start + chunk) for start in range(0, self.cfg.batch_size, chunk)]
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.objective = make_objective(config, self.vocab, self.device)
        self.step_hooks: list[StepHook] = []
        """Called with the trainer once the run has started (before its first step) and after every step."""
        self.lr_scale = 1.0
        self.stage = "main"
        self.epoch = 0
        self.step = 0
        self.position = 0
        self.hidden: State | None = None
        self.epoch_nll = 0.0
        self.epoch_tokens = 0
        self.best_val = math.inf
        self.last_checkpoint: str | None = None

    # ------------------------------------------------------------------ setup and state

    def _new_optimizer(self) -> torch.optim.SGD:
        return torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def start(self) -> None:
        """Claim a fresh run directory (see :func:`reglm.rundir.claim_new`), write its files, let the
        objective set the starting weights (:meth:`prepare`) and write the first ``state.pt``, so
        the run can be resumed from its first step on."""
        if self.lock is None:
            self.lock = claim_new(self.run_dir)
            self._report_takeover()
        write_json(self.run_dir / CONFIG_FILE, self.config.to_dict())
        self._begin()

    def restart(self) -> None:
        """Start over a claimed run directory whose run never wrote a checkpoint: its
        ``config.json`` stays, the rest is written afresh, as by :meth:`start`."""
        self._say(f"{self.run_dir} has no checkpoint yet (it stopped before its first step); starting it over from its {CONFIG_FILE}")
        self._begin()

    def _begin(self) -> None:
        self.vocab.save(self.run_dir / VOCAB_FILE)
        write_json(self.run_dir / ENVIRONMENT_FILE, [environment(self.device)])
        self.metrics.truncate(0)
        self.prepare()
        for hook in self.step_hooks:
            hook(self)
        self.save_checkpoint()

    def _report_takeover(self) -> None:
        line = describe_previous(self.lock) if self.lock is not None else None
        if line:
            self._say(line)

    def close(self) -> None:
        """Release the run directory."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "bptt": self.bptt_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "averager": self.averager.state_dict(),
            "trigger": self.trigger.state_dict(),
            "stage": self.stage,
            "epoch": self.epoch,
            "step": self.step,
            "position": self.position,
            "hidden": state_dict_of(self.hidden),
            "epoch_nll": self.epoch_nll,
            "epoch_tokens": self.epoch_tokens,
            "best_val": self.best_val,
            "lr_scale": self.lr_scale,
            "objective": self.objective.state_dict(),
            "metrics_bytes": self.metrics.size(),
            "vocab_fingerprint": self.vocab.fingerprint(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state`` (as from :func:`~reglm.train.checkpoint.load_state`); an entry that does
        not fit this run is a ReglmError, raised before anything is written."""
        path = self.run_dir / STATE_FILE
        if state.get("vocab_fingerprint") != self.vocab.fingerprint():
            raise ReglmError(f"{path} was built for another vocabulary than the corpus {self.config.data.name!r} now gives; resume with the original data")
        if state["position"] >= self.train_plan.columns:
            raise ReglmError(f"{path} does not fit the run in {CONFIG_FILE} (its position in the training stream is beyond it); resume it with its own config.json")
        entry = "model"
        try:
            self.model.load_state_dict(state["model"])
            entry = "optimizer"
            self.optimizer.load_state_dict(state["optimizer"])
            entry = "averager"
            self.averager.load_state_dict(state["averager"])
            entry = "trigger"
            self.trigger.load_state_dict(state["trigger"])
            entry = "objective"
            self.objective.load_state_dict(state["objective"])
            entry = "hidden"
            hidden = None if state["hidden"] is None else self.model.encoder.load_state(state["hidden"]).to(self.device)
            entry = "rng"
            torch.set_rng_state(state["rng"]["torch"])
            self.bptt_rng.set_state(state["rng"]["bptt"])
            if self.device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as exc:
            raise ReglmError(f"{path}: its {entry!r} entry does not fit the run in {CONFIG_FILE} ({_first_line(exc)}); resume with the run's own files, or start a new run with another --out") from None
        self.stage, self.epoch, self.step, self.position = state["stage"], state["epoch"], state["step"], state["position"]
        self.hidden = hidden
        self.epoch_nll, self.epoch_tokens, self.best_val = float(state["epoch_nll"]), state["epoch_tokens"], float(state["best_val"])
        self.lr_scale = float(state["lr_scale"])
        self.metrics.truncate(state["metrics_bytes"])
        self.last_checkpoint = self._checkpoint_name()

    def _checkpoint_name(self) -> str:
        return f"{self.run_dir / STATE_FILE} (stage {self.stage}, epoch {self.epoch}, step {self.step})"

    def _diverged(self, what: str, step: int | None = None) -> TrainingDiverged:
        return TrainingDiverged(
            f"{what} at step {self.step if step is None else step} (stage {self.stage}, epoch {self.epoch + 1}); nothing was saved from it. "
            f"Last good checkpoint: {self.last_checkpoint or 'none yet'}. Lower train.lr or train.clip and resume or restart."
        )

    def _require_finite(self, module: torch.nn.Module) -> None:
        if not _finite(module):
            raise self._diverged("a parameter became NaN or infinite")

    def save_checkpoint(self) -> None:
        self._require_finite(self.model)
        save_state(self.run_dir / STATE_FILE, self.state_dict())
        self.last_checkpoint = self._checkpoint_name()

    def prepare(self) -> None:
        """At a fresh start (part of :meth:`start`): let the objective set the starting weights (a base model's, for
        fine-tuning) and, when the run starts from a model, log that model's validation scores
        as the ``initial`` event (Table 2's "Initial model" row of Popov & Kudinov)."""
        self.objective.prepare(self.model)
        if self.objective.initial_model() is not None:
            val = self._score(self.model, self.corpus.valid, self.cfg.eval_batch_size, "valid")
            self.metrics.log(event="initial", step=0, **{f"valid_{name}": value for name, value in val.metrics.items() if name != "tokens"})
            self._say("initial model: " + ", ".join(f"valid {name} {value:.4g}" for name, value in val.metrics.items() if name != "tokens"))

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train until the run is done; returns the final results. The run directory is released
        when this returns or raises."""
        try:
            while self.stage != "done":
                if self.stage == "main" and self.epoch >= self.cfg.epochs:
                    self._begin_finetune() if self.cfg.finetune else self._set_stage("done")
                    continue
                if self.stage == "finetune" and self.epoch >= self.cfg.finetune_epochs:
                    self._set_stage("done")
                    continue
                self._train_epoch()
                self._end_epoch()
            return self.finish()
        finally:
            self.close()

    def _set_stage(self, stage: str) -> None:
        self.stage = stage
        self.save_checkpoint()

    def _begin_finetune(self) -> None:
        """ASGD with T = 0, hot-started from the best model (AWD-LSTM section 5)."""
        best, _, _ = load_model_dir(self.run_dir / "best", self.device)
        self.model.load_state_dict(best.state_dict())
        self.optimizer = self._new_optimizer()
        self.trigger = NonMonotoneTrigger(self.cfg.nonmono, self.cfg.trigger)
        self.averager.start(self.model.parameters())
        self.stage, self.epoch = "finetune", 0
        self.metrics.log(event="stage", stage="finetune", step=self.step)
        self._say(f"fine-tuning: ASGD restarted with T=0 from {self.run_dir / 'best'}")
        self.save_checkpoint()

    def _train_epoch(self) -> None:
        cfg, model = self.cfg, self.model
        model.train()
        plan = self.train_plan
        length = plan.columns + 1
        if self.hidden is None:
            self.hidden = model.init_state(plan.batch_size, device=self.device)
        adversarial, noise_std = self._advsoft_on(), self._input_noise_std()
        bar = tqdm(total=length - 1, initial=self.position, disable=not self.progress, unit="tok/stream", leave=False, desc=f"{self.stage} epoch {self.epoch + 1}")
        window_nll, window_tokens, window_start = 0.0, 0, time.perf_counter()
        while self.position < length - 2:
            seq_len = sample_bptt(self.bptt_rng, cfg.bptt, cfg.bptt_p, cfg.bptt_std, cfg.bptt_min, cfg.bptt_max) if cfg.variable_bptt else cfg.bptt
            lr = scaled_lr(self._base_lr(), seq_len, cfg.bptt)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            window = plan.window(self.position, seq_len)
            x, y = window.inputs, window.targets
            self.optimizer.zero_grad(set_to_none=True)
            nll_sum, chunk_states = 0.0, []
            for streams in self.chunks:
                out = model(x[streams], select_streams(self.hidden, streams), input_noise=noise_std)
                scored = self.objective.chunk_loss(model, out, x[streams], y[streams], streams, x.size(0), adversarial)
                raw_loss = scored.nll.mean()
                loss = raw_loss + scored.penalty + activation_reg(out.output, cfg.ar_alpha) + temporal_activation_reg(out.raw_output, cfg.tar_beta)
                if cfg.sequence_loss:
                    loss = loss * x.size(1)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise self._diverged(f"the training loss became {loss_value}", self.step + 1)
                (loss * (scored.nll.size(0) / x.size(0))).backward()
                chunk_states.append(detach_state(out.state))
                nll_sum += float(raw_loss.detach()) * scored.nll.numel()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            self.optimizer.step()
            if self.averager.active:
                self.averager.update(model.parameters())
            self.hidden = concat_states(chunk_states)
            self.objective.end_step()
            self.position += x.size(1)
            self.step += 1
            self.epoch_nll += nll_sum
            self.epoch_tokens += y.numel()
            window_nll += nll_sum
            window_tokens += y.numel()
            bar.update(x.size(1))
            if self.step % cfg.log_interval == 0:
                elapsed = time.perf_counter() - window_start
                mean = window_nll / window_tokens
                self.metrics.log(event="step", stage=self.stage, epoch=self.epoch + 1, step=self.step, lr=lr, loss=mean, ppl=perplexity(mean), tokens_per_s=window_tokens / max(elapsed, 1e-9), averaging=self.averager.active)
                bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{perplexity(mean):.1f}")
                window_nll, window_tokens, window_start = 0.0, 0, time.perf_counter()
            for hook in self.step_hooks:
                hook(self)
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                self.save_checkpoint()
            if self.stop is not None and self.stop.requested:
                bar.close()
                self._interrupt()
        bar.close()

    def _base_lr(self) -> float:
        """The epoch's learning rate before the per-batch BPTT rescaling: the stage's rate, decayed
        per ``train.lr_decay`` in the main stage, times the plateau factor accumulated so far."""
        cfg = self.cfg
        if self.stage == "finetune":
            return (cfg.finetune_lr if cfg.finetune_lr is not None else cfg.lr) * self.lr_scale
        return cfg.lr * cfg.lr_decay ** max(0, self.epoch + 1 - cfg.lr_decay_start) * self.lr_scale

    def _advsoft_on(self) -> bool:
        """Whether this epoch trains with the adversarial softmax."""
        if self.config.model.advsoft is None:
            return False
        if self.stage == "finetune":
            return self.cfg.advsoft_finetune
        return self.cfg.advsoft_stop_epoch is None or self.epoch < self.cfg.advsoft_stop_epoch

    def _input_noise_std(self) -> float:
        """The std of this epoch's input-embedding noise."""
        cfg = self.cfg
        if self.stage == "finetune":
            return cfg.finetune_input_noise_std
        return annealed_std(cfg.input_noise_std, cfg.input_noise_anneal, self.epoch, cfg.input_noise_epochs)

    def _score(self, model: torch.nn.Module, ids: torch.Tensor, batch_size: int, desc: str) -> ObjectiveEval:
        return self.objective.score(model, ids, batch_size, self.cfg.bptt, self.device, self.progress, desc)

    def _end_epoch(self) -> None:
        eval_model = self._eval_weights()
        val = self._score(eval_model, self.corpus.valid, self.cfg.eval_batch_size, "valid")
        if not math.isfinite(val.selection):
            raise self._diverged(f"the validation score became {val.selection}")
        self._require_finite(eval_model)
        train_loss = self.epoch_nll / max(self.epoch_tokens, 1)
        adversarial, noise_std = self._advsoft_on(), self._input_noise_std()
        lr = self._base_lr()
        self.epoch += 1
        improved = val.selection < self.best_val
        valid = {f"valid_{name}": value for name, value in val.metrics.items() if name != "tokens"}
        self.metrics.log(
            event="epoch", stage=self.stage, epoch=self.epoch, step=self.step,
            train_loss=train_loss, train_ppl=perplexity(train_loss), **valid,
            lr=lr, averaging=self.averager.active, best=improved, advsoft=adversarial, input_noise=noise_std,
        )
        shown = " | ".join(f"valid {name} {value:9.4g}" for name, value in val.metrics.items() if name != "tokens")
        self._say(f"| {self.stage} | epoch {self.epoch:3d} | step {self.step:7d} | train loss {train_loss:7.4f} | {shown}" + (" | averaging" if self.averager.active else "") + (" | best" if improved else ""))
        info = {"stage": self.stage, "epoch": self.epoch, "step": self.step, **valid, "averaged": self.averager.active}
        if improved:
            self.best_val = val.selection
            save_model_dir(self.run_dir / "best", eval_model, self.config, self.vocab, info)
        elif self.cfg.plateau_factor is not None:
            self.lr_scale *= self.cfg.plateau_factor
            self.metrics.log(event="plateau", stage=self.stage, epoch=self.epoch, step=self.step, lr=self._base_lr())
            self._say(f"no improvement: learning rate x{self.cfg.plateau_factor:g} -> {self._base_lr():.4g}")
        save_model_dir(self.run_dir / "last", eval_model, self.config, self.vocab, info)
        if self.stage == "main" and self.cfg.optimizer == "ntasgd" and not self.averager.active:
            if self.trigger.update(val.selection):
                self.averager.start(self.model.parameters())
                self.metrics.log(event="trigger", stage=self.stage, epoch=self.epoch, step=self.step, valid_loss=val.selection)
                self._say(f"NT-ASGD: averaging starts after epoch {self.epoch} (step {self.step})")
        elif self.stage == "finetune" and self.trigger.update(val.selection):
            self.metrics.log(event="finetune_stop", epoch=self.epoch, step=self.step, valid_loss=val.selection)
            self._say(f"fine-tuning stops after epoch {self.epoch}: the non-monotone criterion fired")
            self.stage = "done"
        self.position, self.hidden, self.epoch_nll, self.epoch_tokens = 0, None, 0.0, 0
        self.objective.reset()
        self.save_checkpoint()
        if self.stop is not None and self.stop.requested:
            self._interrupt()

    def _eval_weights(self) -> torch.nn.Module:
        """The model evaluation sees: the average once averaging runs, else the iterate."""
        if self.averager.active:
            self.eval_model.load_state_dict(self.averager.averaged_state(self.model))
        else:
            self.eval_model.load_state_dict(self.model.state_dict())
        return self.eval_model

    def finish(self) -> dict[str, Any]:
        """Score ``best/`` on validation and test and write ``results.json``."""
        model, _, _ = load_model_dir(self.run_dir / "best", self.device)
        cfg = self.cfg
        results: dict[str, Any] = {"best": str(self.run_dir / "best"), "objective": self.objective.kind}
        if self.objective.kind != "lm":
            for split, batch_size in (("valid", cfg.eval_batch_size), ("test", cfg.test_batch_size)):
                results[split] = self._score(model, getattr(self.corpus, split), batch_size, split).metrics
            self.metrics.log(event="final", step=self.step, **{f"{k}_{m}": v for k in ("valid", "test") for m, v in results[k].items()})
            write_json(self.run_dir / "results.json", results)
            self._say("best model: " + ", ".join(f"{split} {name} {value:.4g}" for split in ("valid", "test") for name, value in results[split].items() if name != "tokens"))
            return results
        valid = evaluate(model, self.corpus.valid, cfg.eval_batch_size, cfg.bptt, self.device, progress=self.progress, desc="valid")
        test = evaluate(model, self.corpus.test, cfg.test_batch_size, cfg.bptt, self.device, keep_token_nll=self.corpus.truth is not None, progress=self.progress, desc="test")
        results["valid"], results["test"] = valid.as_dict(), test.as_dict()
        if self.corpus.truth is not None:
            results["synthetic"] = truth_comparison(test, self.corpus.test, self.corpus.truth["test"], self.vocab.eos_id)
        self.metrics.log(event="final", step=self.step, **{f"{k}_{m}": v for k in ("valid", "test") for m, v in results[k].items()})
        write_json(self.run_dir / "results.json", results)
        self._say(f"best model: valid ppl {valid.ppl:.2f}, test ppl {test.ppl:.2f} ({test.tokens} tokens)")
        if "synthetic" in results:
            s = results["synthetic"]
            self._say(f"synthetic test, words only: model ppl {s['model_word_ppl']:.2f} vs true ppl {s['true_word_ppl']:.2f}")
        return results

    # ------------------------------------------------------------------ stopping and output

    def _interrupt(self) -> None:
        self.save_checkpoint()
        assert self.stop is not None and self.stop.signum is not None
        raise TrainingInterrupted(self.stop.signum, self.run_dir, self.step)

    def _say(self, text: str) -> None:
        if self.progress:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


def truth_comparison(result: EvalResult, ids: torch.Tensor, true_logp: torch.Tensor, eos_id: int) -> dict[str, float]:
    """Model vs true perplexity over the same scored targets, ``<eos>`` targets excluded."""
    assert result.token_nll is not None and result.positions is not None
    targets = ids[result.positions]
    words = targets != eos_id
    model_nll = result.token_nll[words].double()
    true_nll = -true_logp[result.positions][words].double()
    return {
        "words": int(words.sum()),
        "model_word_ppl": perplexity(float(model_nll.mean())),
        "true_word_ppl": perplexity(float(true_nll.mean())),
        "mean_logq_minus_logp": float((true_nll - model_nll).mean()),
        "std_logq_minus_logp": float((true_nll - model_nll).std()),
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def train(
    config: RunConfig, run_dir: Path, progress: bool | None = None, stop: StopRequest | None = None,
    corpus: Corpus | None = None, step_hooks: Sequence[StepHook] = (),
) -> dict[str, Any]:
    """Start a new run in ``run_dir`` and train it to the end (``corpus``: the one ``config``
    names, when already loaded; ``step_hooks``: see :attr:`Trainer.step_hooks`)."""
    corpus = corpus if corpus is not None else load_corpus(config)
    trainer = Trainer(config, run_dir, corpus, progress, stop)
    trainer.step_hooks.extend(step_hooks)
    try:
        trainer.start()
        trainer._say(f"run {run_dir}: {trainer.model.num_parameters():,} parameters, vocabulary {len(corpus.vocab):,}, device {trainer.device}")
    except BaseException:
        trainer.close()
        raise
    return trainer.run()


def resume(
    run_dir: Path, progress: bool | None = None, stop: StopRequest | None = None, corpus: Corpus | None = None, step_hooks: Sequence[StepHook] = (),
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint (or start it over from its
    ``config.json`` when it stopped before writing one). Everything is checked before anything
    is written."""
    run_dir = Path(run_dir)
    lock = claim_existing(run_dir)
    try:
        config = load_config_file(run_dir / CONFIG_FILE)
        state = load_state(run_dir / STATE_FILE) if (run_dir / STATE_FILE).is_file() else None
        corpus = corpus if corpus is not None else load_corpus(config)
        if state is not None:
            saved_vocab = Vocab.load(run_dir / VOCAB_FILE)
            if saved_vocab != corpus.vocab:
                raise ReglmError(f"the corpus {config.data.name!r} now gives another vocabulary than {run_dir / VOCAB_FILE}; resume with the data the run was started on")
        trainer = Trainer(config, run_dir, corpus, progress, stop, lock)
        trainer.step_hooks.extend(step_hooks)
    except BaseException:
        lock.release()
        raise
    try:
        trainer._report_takeover()
        if state is None:
            trainer.restart()
        else:
            trainer.load_state_dict(state)
            sessions = _read_environment(run_dir)
            write_json(run_dir / ENVIRONMENT_FILE, sessions + [environment(trainer.device)])
            trainer._say(f"resuming {run_dir} at stage {trainer.stage}, epoch {trainer.epoch + (trainer.stage != 'done')}, step {trainer.step}")
    except BaseException:
        trainer.close()
        raise
    return trainer.run()


def _read_environment(run_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((run_dir / ENVIRONMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else [data]
