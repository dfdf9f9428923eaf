"""The synthetic-data study of Popov & Kudinov (2019), section 3: Table 1 and Figure 1.

On the synthetic trigram corpus, whose true probabilities are known (:mod:`reglm.data.synthetic`):

1. ``initial/``: train the initial model -- a 2-layer LSTM of ``hidden`` units with embeddings of
   the same size, untied, no regularization, SGD at ``lr`` with global-norm clipping ``clip``,
   the learning rate multiplied by 0.1 whenever an epoch does not improve validation
   (appendix A); "trained to its optimum" is read as: until the third such drop
   (``plateau_stop``), within ``epochs``.
2. ``perturbed/``: the initial model with the output bias of one "almost frequent" word (the
   ``chosen_rank``-th most frequent training word; ranks 51-150 are almost frequent) set to
   ``perturb_bias``, a large negative value.
3. ``disc-initial/``, ``disc-perturbed/``: a discriminator for each, same architecture and
   optimizer settings as the initial model (appendix A).
4. Fine-tunings of both models: ``ftd-initial/``, ``ftd-perturbed/`` with the discriminator
   (loss (12), learning rate ``finetune_lr``), and ``ce-<lr>-initial/``, ``ce-<lr>-perturbed/``
   with cross-entropy only at each learning rate of ``ce_lrs`` (Figure 1 compares 0.1 and 0.01).

Every stage is an ordinary reglm run directory under the study's output directory; a stage that
has ``results.json`` is reused and an interrupted one is resumed, so the whole command is
resumable. The fine-tunings log, after every SGD step, the probability their model gives the
chosen word in one fixed context (event ``chosen_word`` in ``metrics.jsonl``): Figure 1's right
panel; and the probabilities of the words of ``tracked_ranks``, each in its own fixed context
(event ``tracked_word``): Figure 2, an almost frequent word (rank 75 by default) and a frequent
one (rank 10), drawn for the fine-tunings of the perturbed model (our reading of the figure, whose
caption names no starting model) into ``trigram-study-figure2.png``; and, with
``valid_sentences``, the validation perplexity (event ``valid_step``): Figure 1's left panel. The
context is the test-set prefix after which the chosen word has the highest true probability,
read with a zero state from the start of the sentence before its own (which holds the two words
the true probability depends on) -- our reading of the paper's "given some fixed context".

Table 1's columns, over test words (``<eos>`` targets, whose true probability is 1, excluded):
perplexity, perplexity over the 50 most frequent training words and over the rest, their ratio
(rare / frequent), and the mean and standard deviation over tokens of ``log q - log p``.
Reading of "batches containing 1024 sentences": the trainer's contiguous streams, 1024 of them,
with the state carried across windows; every sentence starts after an ``<eos>``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from reglm.config import RunConfig, build_config, derive_config
from reglm.data import Corpus, load_corpus
from reglm.data.synthetic import RULES
from reglm.devices import resolve_device
from reglm.errors import ReglmError
from reglm.io import write_json
from reglm.modeldir import load_model_dir, save_model_dir
from reglm.objectives.reverse_kl import log_p_hat
from reglm.progress import Pace, clock, say
from reglm.rundir import RESULTS_FILE, is_run
from reglm.studies.trigram_measures import (
    ChosenWordTracker,
    fixed_context,
    frequency_ranking,
    read_curve,
    table_row,
    true_row,
)
from reglm.train.run import StopRequest, resume, train


@dataclass(frozen=True)
class TrigramStudySpec:
    """Settings of the study; the defaults are the paper's (appendix A) where it gives them."""

    sentences: int = 80000
    """training sentences of the synthetic corpus (valid and test get one eighth each)"""
    hidden: int = 256
    batch_size: int = 1024
    bptt: int = 11
    """tokens per stream and step: 11 (10 words and the ``<eos>``) makes a batch of ``batch_size``
    streams hold 1,024 sentences, appendix A's "batches containing 1024 sentences" (78 SGD steps
    per epoch of 80k sentences; studies recorded before it used 35: resume them with --bptt 35)"""
    lr: float = 1.0
    clip: float = 1.0
    sequence_loss: bool = True
    """the loss ``lr`` and ``clip`` refer to: true, each sentence's summed over its window and
    averaged over the batch (``train.sequence_loss``, the Zaremba et al. / TensorFlow PTB
    reduction); false, the mean over the batch's tokens. Appendix A does not say which; the summed
    reading trains faster at the same rate and came closer to the paper's initial model
    (docs/discriminator-finetuning.md); studies recorded without the option used the mean"""
    embed_init: float = 1.0
    """the embedding's initial range, ``U(-embed_init, embed_init)`` (``model.input.init_range``).
    Appendix A does not say; 1.0 is near the scale of PyTorch's default ``nn.Embedding``
    initialization, N(0, 1), and SGD at lr 1.0 learns the rare words' contexts far faster from it
    than from AWD-LSTM's 0.1 (docs/discriminator-finetuning.md); studies recorded without the
    option used 0.1"""
    epochs: int = 100
    """upper bound on the initial model's epochs (the plateau schedule does the rest)"""
    plateau_stop: float = 0.001
    """"trained to its optimum", bounded: the initial model and the discriminators stop at the
    epoch whose plateau drop takes the rate to ``lr * plateau_stop`` or below (0.001: the third
    x0.1 drop; ``train.schedule.plateau_stop``), or at their epoch cap; 0: the cap alone (studies
    recorded without it)"""
    disc_epochs: int = 30
    disc_lr: float | None = None
    """learning rate of the discriminators (none: ``lr``, as in appendix A)"""
    finetune_epochs: int = 2
    finetune_lr: float = 1.0
    ce_lrs: tuple[float, ...] = (0.1, 0.01)
    chosen_rank: int = 100
    perturb_bias: float = -20.0
    tracked_ranks: tuple[int, ...] = (75, 10)
    """Figure 2: frequency ranks of further words whose probability every fine-tuning step logs
    (any rank: 1-50 are frequent, 51-150 almost frequent)"""
    valid_sentences: int = 1000
    """Figure 1 (left): after every fine-tuning step, the perplexity over the words of the first
    this many validation sentences (0: not logged; studies recorded without it logged none)"""
    n_frequent: int = 50
    seed: int = 0
    synthetic_rule: str = "stream"
    """the corpus's reading of appendix A (``data.synthetic_rule``); studies recorded without it used ``restart``"""
    device: str = "auto"
    extra: tuple[str, ...] = field(default_factory=tuple)
    """further ``key=value`` overrides of the initial model's run configuration"""

    def __post_init__(self) -> None:
        if self.valid_sentences < 0:
            raise ReglmError(f"--valid-sentences {self.valid_sentences} must be >= 0")
        for name in (
            "sentences",
            "hidden",
            "batch_size",
            "bptt",
            "epochs",
            "disc_epochs",
            "finetune_epochs",
            "n_frequent",
        ):
            if getattr(self, name) < 1:
                raise ReglmError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        for name in ("lr", "clip", "embed_init", "finetune_lr", "disc_lr"):
            if getattr(self, name) is not None and not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ReglmError(f"--{name.replace('_', '-')} {getattr(self, name)} must be > 0")
        if not self.ce_lrs or any(not (math.isfinite(lr) and lr > 0) for lr in self.ce_lrs):
            raise ReglmError(f"--ce-lrs {','.join(map(str, self.ce_lrs))} must list learning rates > 0")
        if not (math.isfinite(self.plateau_stop) and 0 <= self.plateau_stop < 1):
            raise ReglmError(
                f"--plateau-stop {self.plateau_stop} must be in [0, 1) (0.001: the third x0.1 drop; 0: off)"
            )
        if not self.tracked_ranks or any(rank < 1 for rank in self.tracked_ranks):
            raise ReglmError(
                f"--track-ranks {','.join(map(str, self.tracked_ranks))} must list frequency ranks >= 1 (e.g. 75,10)"
            )
        if not self.n_frequent < self.chosen_rank:
            raise ReglmError(
                f"--chosen-rank {self.chosen_rank} must be beyond the {self.n_frequent} frequent words (the paper: "
                "an almost frequent word, ranks 51-150)"
            )
        if self.synthetic_rule not in RULES:
            raise ReglmError(f"--synthetic-rule {self.synthetic_rule!r} must be one of {', '.join(RULES)}")
        if not (math.isfinite(self.perturb_bias) and self.perturb_bias < 0):
            raise ReglmError(f"--perturb-bias {self.perturb_bias} must be a negative number")


def initial_config(spec: TrigramStudySpec) -> RunConfig:
    """The initial model's run: appendix A's LSTM and optimizer on the synthetic corpus."""
    options = [
        "data.name=synthetic",
        f"data.synthetic_sentences={spec.sentences}",
        f"data.synthetic_seed={spec.seed}",
        f"data.synthetic_rule={spec.synthetic_rule}",
        "model.encoder=awd-lstm",
        f"model.emb_size={spec.hidden}",
        f"model.input.init_range={spec.embed_init}",
        f"model.hidden_size={spec.hidden}",
        "model.num_layers=2",
        "model.tie_weights=false",
        "model.embed_dropout=0",
        "model.input_dropout=0",
        "model.hidden_dropout=0",
        "model.output_dropout=0",
        "model.weight_dropout=0",
        f"train.epochs={spec.epochs}",
        f"train.batch_size={spec.batch_size}",
        f"train.eval_batch_size={min(spec.batch_size, 64)}",
        f"train.test_batch_size={min(spec.batch_size, 64)}",
        f"train.bptt={spec.bptt}",
        "train.variable_bptt=false",
        f"train.lr={spec.lr}",
        f"train.clip={spec.clip}",
        f"train.sequence_loss={str(spec.sequence_loss).lower()}",
        "train.plateau_factor=0.1",
        "train.averaging=none",
        "train.finetune=false",
        f"train.schedule.plateau_stop={spec.plateau_stop or 'none'}",
        "train.weight_decay=0",
        "train.ar_alpha=0",
        "train.tar_beta=0",
        f"train.device={spec.device}",
        f"seed={spec.seed}",
        *spec.extra,
    ]
    return build_config(None, options)


class _StudyClock:
    """The study's stages weighed by their planned epochs: a line as each stage starts, with the
    whole study's ETA at the pace of the stages trained in this session (an upper bound: the
    initial model's plateau schedule may end it before ``spec.epochs``)."""

    def __init__(self, spec: TrigramStudySpec) -> None:
        self.stages = 1 + 2 * (2 + len(spec.ce_lrs))
        self.total = spec.epochs + 2 * (spec.disc_epochs + spec.finetune_epochs * (1 + len(spec.ce_lrs)))
        self.done = 0.0
        self.begun = 0
        self.pace = Pace()

    def stage(self, name: str, epochs: int, reused: bool) -> None:
        self.begun += 1
        if reused:
            self.pace.start_fraction += epochs / self.total
        else:
            eta = clock(self.pace.eta(self.done / self.total))
            done = f"{self.done / self.total:.0%} of the planned epochs done"
            say(f"study stage {self.begun}/{self.stages} {name}: {done}, study ETA {eta}")
        self.done += epochs


def _run_stage(
    run_dir: Path,
    config: RunConfig,
    corpus: Corpus,
    progress: bool,
    study: _StudyClock,
    tracker: ChosenWordTracker | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Train one stage into ``run_dir``: reuse a finished one, resume an interrupted one (``stop``:
    honoured at the end of a step, as in ``reglm train``)."""
    reused = (run_dir / RESULTS_FILE).is_file()
    study.stage(run_dir.name, config.train.epochs, reused)
    if reused:
        return {"run": str(run_dir), "reused": True}
    hooks = [] if tracker is None else [tracker]
    if is_run(run_dir):
        resume(run_dir, progress, stop, corpus=corpus, step_hooks=hooks)
    else:
        train(config, run_dir, progress, stop, corpus=corpus, step_hooks=hooks)
    return {"run": str(run_dir), "reused": False}


def run_trigram_study(
    out: Path, spec: TrigramStudySpec, progress: bool = False, stop: StopRequest | None = None
) -> dict[str, Any]:
    """Run (or resume) the whole study in ``out``; returns and writes ``trigram-study.json``
    (``stop``: a stop request, as SIGINT or SIGTERM sets it, ends the current stage with a
    checkpoint and raises :class:`~reglm.errors.TrainingInterrupted`; rerun to resume)."""
    from reglm.analysis.plots import (  # first: without matplotlib, stop before training
        plot_trigram_figure2,
        plot_trigram_study,
    )

    started = time.perf_counter()
    out = Path(out)
    _check_spec(out, spec)
    config = initial_config(spec)
    corpus = load_corpus(config)
    device = resolve_device(config.train.device)
    ranked = frequency_ranking(corpus)
    if spec.chosen_rank > len(ranked):
        raise ReglmError(f"--chosen-rank {spec.chosen_rank} exceeds the {len(ranked)} words of the corpus")
    chosen = ranked[spec.chosen_rank - 1]
    frequent = torch.zeros(len(corpus.vocab), dtype=torch.bool)
    frequent[ranked[: spec.n_frequent]] = True
    context, true_prob = fixed_context(corpus, chosen)
    if max(spec.tracked_ranks) > len(ranked):
        raise ReglmError(f"--track-ranks {max(spec.tracked_ranks)} exceeds the {len(ranked)} words of the corpus")
    tracked = {rank: (ranked[rank - 1], *fixed_context(corpus, ranked[rank - 1])) for rank in spec.tracked_ranks}
    tracker_words = tuple((rank, ctx, word) for rank, (word, ctx, _) in tracked.items())
    valid = None
    if spec.valid_sentences:
        ends = (corpus.valid == corpus.vocab.eos_id).nonzero().flatten()
        valid = corpus.valid[: int(ends[min(spec.valid_sentences, ends.numel()) - 1]) + 1]

    study = _StudyClock(spec)
    _run_stage(out / "initial", config, corpus, progress, study, stop=stop)
    perturbed_dir = out / "perturbed"
    if not (perturbed_dir / "model.safetensors").is_file():
        model, saved_config, vocab = load_model_dir(out / "initial" / "best")
        with torch.no_grad():
            model.output.bias[chosen] = spec.perturb_bias
        save_model_dir(
            perturbed_dir,
            model,
            saved_config,
            vocab,
            {"perturbed_word": corpus.vocab.itos[chosen], "bias": spec.perturb_bias},
        )
    bases = {"initial": (out / "initial" / "best").resolve(), "perturbed": perturbed_dir.resolve()}
    disc_options = [f"train.epochs={spec.disc_epochs}", f"train.lr={spec.disc_lr or spec.lr}"]
    stages: dict[str, dict[str, Any]] = {}
    for name, base in bases.items():
        disc_dir = out / f"disc-{name}"
        disc_config = derive_config(
            config, None, disc_options, {"kind": "discriminator", "base_model": str(base)}, "a discriminator"
        )
        _run_stage(disc_dir, disc_config, corpus, progress, study, stop=stop)
        runs = {
            f"ftd-{name}": (
                {"kind": "reverse-kl", "base_model": str(base), "discriminator": str((disc_dir / "best").resolve())},
                spec.finetune_lr,
            )
        }
        for lr in spec.ce_lrs:
            runs[f"ce-{lr:g}-{name}"] = ({"kind": "lm", "base_model": str(base)}, lr)
        for stage, (objective, lr) in runs.items():
            options = [f"train.epochs={spec.finetune_epochs}", f"train.lr={lr}", "train.plateau_factor=none"]
            stage_config = derive_config(config, None, options, objective, "fine-tuning")
            tracker = ChosenWordTracker(context, chosen, tracker_words, valid)
            _run_stage(out / stage, stage_config, corpus, progress, study, tracker, stop)
            stages[stage] = {"base": name, "lr": lr, "objective": objective["kind"]}

    rows = {"true distribution": true_row(corpus, frequent)}
    for name in ("initial", "perturbed"):
        model, _, _ = load_model_dir(bases[name], device)
        rows[f"{name} model"] = table_row(
            model, corpus, frequent, config.train.batching.test_batch_size, device, chosen
        )
        for stage, info in stages.items():
            if info["base"] == name:
                tuned, _, _ = load_model_dir(out / stage / "best", device)
                rows[stage] = table_row(tuned, corpus, frequent, config.train.batching.test_batch_size, device, chosen)
    curves = {stage: read_curve(out / stage) for stage in stages}
    disc_prob = _p_hat(out, bases, context, chosen, device)
    result = {
        "spec": asdict(spec),
        "chosen_word": corpus.vocab.itos[chosen],
        "chosen_rank": spec.chosen_rank,
        "context": [corpus.vocab.itos[i] for i in context.tolist()],
        "true_prob": true_prob,
        "p_hat": disc_prob,
        "tracked": {
            str(rank): {
                "word": corpus.vocab.itos[word],
                "context": [corpus.vocab.itos[i] for i in ctx.tolist()],
                "true_prob": prob,
            }
            for rank, (word, ctx, prob) in tracked.items()
        },
        "table": rows,
        "stages": stages,
        "curves": curves,
        "seconds": time.perf_counter() - started,
    }
    write_json(out / "trigram-study.json", result)
    plot_trigram_study(result, out / "trigram-study.png")
    plot_trigram_figure2(result, out / "trigram-study-figure2.png")
    return result


def _check_spec(out: Path, spec: TrigramStudySpec) -> None:
    """Record the spec in ``out/study-spec.json``; a directory started with other settings is refused
    (its finished stages would otherwise be reused under the wrong settings)."""
    path = out / "study-spec.json"
    current = json.loads(json.dumps(asdict(spec)))
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved.setdefault("synthetic_rule", "restart")
        saved.setdefault("valid_sentences", 0)
        saved.setdefault("plateau_stop", 0.0)
        saved.setdefault("sequence_loss", False)
        saved.setdefault("embed_init", 0.1)
        if saved != current:
            changed = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
            raise ReglmError(
                f"{out} holds a study started with other settings ({', '.join(changed)}); rerun with those "
                "settings to resume it, or choose another --out"
            )
        return
    write_json(path, current)


@torch.no_grad()
def _p_hat(
    out: Path, bases: dict[str, Path], context: torch.Tensor, word: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """For each base model: its probability of the chosen word in the fixed context and the
    discriminator's estimate ``p_hat = q0 exp(-s)`` (eq. 8) there."""
    values = {}
    for name, base in bases.items():
        q0, _, _ = load_model_dir(base, device)
        disc, _, _ = load_model_dir(out / f"disc-{name}" / "best", device)
        ids = context.to(device).unsqueeze(0)
        q0.eval()
        disc.eval()
        log_q0 = q0.log_probs(ids)[0][0, -1]
        log_p_hat_ = log_p_hat(log_q0, disc.output.full_logits(disc(ids))[0, -1])
        values[name] = {"q0": float(log_q0[word].exp()), "p_hat": float(log_p_hat_[word].exp())}
    return values
