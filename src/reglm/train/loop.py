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

Resume: ``state.pt`` is written at every epoch end, every ``train.checkpoint_interval`` steps and
when SIGINT/SIGTERM arrives. It holds the weights, the average, the trigger log, the stage, epoch,
step, the position in the training stream, the carried hidden state (every chunk's, concatenated
along the stream axis), the epoch's running loss and every RNG state, so on CPU a resumed run
ends with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from reglm.config import RunConfig, load_config_file
from reglm.data import Corpus, Vocab, batchify, get_batch, resolve
from reglm.encoders.awd_lstm import concat_streams, detach_state
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import EvalResult, evaluate
from reglm.io import environment, write_json
from reglm.models import LanguageModel
from reglm.objectives.activation_reg import activation_reg, temporal_activation_reg
from reglm.train.checkpoint import STATE_FILE, VOCAB_FILE, load_model_dir, load_state, save_model_dir, save_state
from reglm.train.metrics import MetricsLog
from reglm.train.ntasgd import NonMonotoneTrigger, ParameterAverager
from reglm.train.objective import ObjectiveEval, make_objective
from reglm.train.schedules import annealed_std, sample_bptt, scaled_lr

CONFIG_FILE = "config.json"


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved in response to SIGINT/SIGTERM."""

    def __init__(self, signum: int, run_dir: Path, step: int):
        self.signum = signum
        super().__init__(f"interrupted at step {step}; checkpoint saved. Resume with: reglm train --resume {run_dir}")


class TrainingDiverged(ReglmError):
    """The loss became NaN or infinite; nothing bad was written."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ReglmError(f"train.device={name} but no CUDA device is available; use train.device=cpu")
    return torch.device(name)


def load_corpus(config: RunConfig) -> Corpus:
    d = config.data
    return resolve(d.name, data_dir=d.data_dir, min_freq=d.min_freq, max_vocab=d.max_vocab, synthetic_seed=d.synthetic_seed, synthetic_sentences=d.synthetic_sentences)


class Trainer:
    """Owns the model, optimizer, average, trigger and position of one run directory."""

    def __init__(self, config: RunConfig, run_dir: Path, corpus: Corpus, progress: bool | None = None):
        self.config = config
        self.cfg = config.train
        self.run_dir = Path(run_dir)
        self.corpus = corpus
        self.vocab: Vocab = corpus.vocab
        self.device = resolve_device(self.cfg.device)
        self.progress = sys.stderr.isatty() if progress is None else progress
        torch.manual_seed(config.seed)
        self.bptt_rng = torch.Generator().manual_seed(config.seed)
        self.model = LanguageModel(config.model, len(self.vocab)).to(self.device)
        self.eval_model = LanguageModel(config.model, len(self.vocab)).to(self.device)
        self.optimizer = self._new_optimizer()
        self.averager = ParameterAverager()
        self.trigger = NonMonotoneTrigger(self.cfg.nonmono, self.cfg.trigger)
        self.train_data = batchify(corpus.train, self.cfg.batch_size).to(self.device)
        chunk = self.cfg.small_batch_size or self.cfg.batch_size
        self.chunks = [slice(start, start + chunk) for start in range(0, self.cfg.batch_size, chunk)]
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.objective = make_objective(config, self.vocab, self.device)
        self.step_hooks: list[Callable[[Trainer], None]] = []
        self.lr_scale = 1.0
        self.stage = "main"
        self.epoch = 0
        self.step = 0
        self.position = 0
        self.hidden: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.epoch_nll = 0.0
        self.epoch_tokens = 0
        self.best_val = math.inf
        self.last_checkpoint: str | None = None
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ setup and state

    def _new_optimizer(self) -> torch.optim.SGD:
        return torch.optim.SGD(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def start(self) -> None:
        """Initialize a fresh run directory (refuses to touch one that holds a run)."""
        if (self.run_dir / CONFIG_FILE).exists() or (self.run_dir / STATE_FILE).exists():
            raise ReglmError(f"{self.run_dir} already holds a run; resume it with `reglm train --resume {self.run_dir}` or choose another --out")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / CONFIG_FILE, self.config.to_dict())
        self.vocab.save(self.run_dir / VOCAB_FILE)
        write_json(self.run_dir / "environment.json", [environment(self.device)])
        self.metrics.truncate(0)

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
            "hidden": None if self.hidden is None else [[h, c] for h, c in self.hidden],
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
        if state.get("vocab_fingerprint") != self.vocab.fingerprint():
            raise ReglmError(f"{self.run_dir / STATE_FILE} was built for another vocabulary than the corpus {self.config.data.name!r} now gives; resume with the original data")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ReglmError(f"{self.run_dir / STATE_FILE} does not fit the model in config.json ({str(exc).splitlines()[0]})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.averager.load_state_dict(state["averager"])
        self.trigger.load_state_dict(state["trigger"])
        self.stage, self.epoch, self.step, self.position = state["stage"], state["epoch"], state["step"], state["position"]
        self.hidden = None if state["hidden"] is None else [(h.to(self.device), c.to(self.device)) for h, c in state["hidden"]]
        self.epoch_nll, self.epoch_tokens, self.best_val = state["epoch_nll"], state["epoch_tokens"], state["best_val"]
        self.lr_scale = state.get("lr_scale", 1.0)
        self.objective.load_state_dict(state.get("objective", {}))
        torch.set_rng_state(state["rng"]["torch"])
        self.bptt_rng.set_state(state["rng"]["bptt"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.metrics.truncate(state["metrics_bytes"])
        self.last_checkpoint = f"{self.run_dir / STATE_FILE} (stage {self.stage}, epoch {self.epoch}, step {self.step})"

    def save_checkpoint(self) -> None:
        save_state(self.run_dir / STATE_FILE, self.state_dict())
        self.last_checkpoint = f"{self.run_dir / STATE_FILE} (stage {self.stage}, epoch {self.epoch}, step {self.step})"

    def prepare(self) -> None:
        """At a fresh start: let the objective set the starting weights (a base model's, for
        fine-tuning) and, when the run starts from a model, log that model's validation scores
        as the ``initial`` event (Table 2's "Initial model" row of Popov & Kudinov)."""
        self.objective.prepare(self.model)
        if self.objective.initial_model() is not None:
            val = self._score(self.model, self.corpus.valid, self.cfg.eval_batch_size, "valid")
            self.metrics.log(event="initial", step=0, **{f"valid_{name}": value for name, value in val.metrics.items() if name != "tokens"})
            self._say("initial model: " + ", ".join(f"valid {name} {value:.4g}" for name, value in val.metrics.items() if name != "tokens"))

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """Train until the run is done; returns the final results."""
        handlers = self._install_signal_handlers()
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
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return self.finish()

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
        data = self.train_data
        length = data.size(1)
        if self.hidden is None:
            self.hidden = model.init_state(data.size(0), device=self.device)
        adversarial, noise_std = self._advsoft_on(), self._input_noise_std()
        bar = tqdm(total=length - 1, initial=self.position, disable=not self.progress, unit="tok/stream", leave=False, desc=f"{self.stage} epoch {self.epoch + 1}")
        window_nll, window_tokens, window_start = 0.0, 0, time.perf_counter()
        while self.position < length - 2:
            seq_len = sample_bptt(self.bptt_rng, cfg.bptt, cfg.bptt_p, cfg.bptt_std, cfg.bptt_min, cfg.bptt_max) if cfg.variable_bptt else cfg.bptt
            lr = scaled_lr(self._base_lr(), seq_len, cfg.bptt)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(data, self.position, seq_len)
            self.optimizer.zero_grad(set_to_none=True)
            nll_sum, chunk_states = 0.0, []
            for streams in self.chunks:
                out = model(x[streams], [(h[:, streams], c[:, streams]) for h, c in self.hidden], input_noise=noise_std)
                scored = self.objective.chunk_loss(model, out, x[streams], y[streams], streams, x.size(0), adversarial)
                raw_loss = scored.nll.mean()
                loss = raw_loss + scored.penalty + activation_reg(out.output, cfg.ar_alpha) + temporal_activation_reg(out.raw_output, cfg.tar_beta)
                if cfg.sequence_loss:
                    loss = loss * x.size(1)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(
                        f"the training loss became {loss_value} at step {self.step + 1} (stage {self.stage}, epoch {self.epoch + 1}); "
                        f"nothing was saved from this step. Last good checkpoint: {self.last_checkpoint or 'none yet'}. "
                        "Lower train.lr or train.clip and resume or restart."
                    )
                (loss * (scored.nll.size(0) / x.size(0))).backward()
                chunk_states.append(detach_state(out.state))
                nll_sum += float(raw_loss.detach()) * scored.nll.numel()
            if cfg.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            self.optimizer.step()
            if self.averager.active:
                self.averager.update(model.parameters())
            self.hidden = concat_streams(chunk_states)
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
                self.metrics.log(event="step", stage=self.stage, epoch=self.epoch + 1, step=self.step, lr=lr, loss=mean, ppl=math.exp(min(mean, 700)), tokens_per_s=window_tokens / max(elapsed, 1e-9), averaging=self.averager.active)
                bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{math.exp(min(mean, 700)):.1f}")
                window_nll, window_tokens, window_start = 0.0, 0, time.perf_counter()
            for hook in self.step_hooks:
                hook(self)
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0:
                self.save_checkpoint()
            if self._stop_signal is not None:
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
        train_loss = self.epoch_nll / max(self.epoch_tokens, 1)
        adversarial, noise_std = self._advsoft_on(), self._input_noise_std()
        lr = self._base_lr()
        self.epoch += 1
        improved = val.selection < self.best_val
        valid = {f"valid_{name}": value for name, value in val.metrics.items() if name != "tokens"}
        self.metrics.log(
            event="epoch", stage=self.stage, epoch=self.epoch, step=self.step,
            train_loss=train_loss, train_ppl=math.exp(min(train_loss, 700)), **valid,
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
        if self._stop_signal is not None:
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

    # ------------------------------------------------------------------ signals and output

    def _install_signal_handlers(self) -> dict[int, Any]:
        def request_stop(signum: int, _frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            self._say("stop requested: saving a checkpoint at the end of this step (send again to abort without saving)")

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
        return previous

    def _interrupt(self) -> None:
        self.save_checkpoint()
        raise TrainingInterrupted(self._stop_signal or signal.SIGINT, self.run_dir, self.step)

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
        "model_word_ppl": math.exp(float(model_nll.mean())),
        "true_word_ppl": math.exp(float(true_nll.mean())),
        "mean_logq_minus_logp": float((true_nll - model_nll).mean()),
        "std_logq_minus_logp": float((true_nll - model_nll).std()),
    }


def train(config: RunConfig, run_dir: Path, progress: bool | None = None) -> dict[str, Any]:
    """Start a new run in ``run_dir`` and train it to the end."""
    corpus = load_corpus(config)
    trainer = Trainer(config, run_dir, corpus, progress)
    trainer.start()
    trainer.prepare()
    trainer._say(f"run {run_dir}: {trainer.model.num_parameters():,} parameters, vocabulary {len(corpus.vocab):,}, device {trainer.device}")
    return trainer.run()


def resume(run_dir: Path, progress: bool | None = None) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its last checkpoint."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReglmError(f"run directory {run_dir} does not exist")
    config = load_config_file(run_dir / CONFIG_FILE)
    state = load_state(run_dir / STATE_FILE)
    corpus = load_corpus(config)
    saved_vocab = Vocab.load(run_dir / VOCAB_FILE)
    if saved_vocab != corpus.vocab:
        raise ReglmError(f"the corpus {config.data.name!r} now gives another vocabulary than {run_dir / VOCAB_FILE}; resume with the data the run was started on")
    trainer = Trainer(config, run_dir, corpus, progress)
    trainer.load_state_dict(state)
    sessions = _read_environment(run_dir)
    write_json(run_dir / "environment.json", sessions + [environment(trainer.device)])
    trainer._say(f"resuming {run_dir} at stage {trainer.stage}, epoch {trainer.epoch + (trainer.stage != 'done')}, step {trainer.step}")
    return trainer.run()


def _read_environment(run_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((run_dir / "environment.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else [data]
