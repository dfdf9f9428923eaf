"""The validation experiment of Inan, Khosravi & Socher (2017), section 6.2 / Figure 1.

Section 4 argues that the augmented loss (:mod:`reglm.objectives.augmented_loss`) drives the
output projection ``W`` into the column space of the input embedding ``L^T``; section 6.2 checks
it. Each *training*:

* takes a random contiguous slice of ``words`` (20,000) training tokens -- the offset drawn from
  the run's seed;
* builds a 2-layer LSTM language model (:class:`~reglm.models.LanguageModel`) with
  ``emb_size = hidden_size = hidden`` (300), untied, over the full vocabulary, with no
  regularization at all: every dropout 0, no weight decay, no AR/TAR;
* minimizes eq. 6.1, ``J_tot = beta J_aug tau^2 |V| + (1 - beta) J``, with ``J`` the mean token
  cross-entropy and ``J_aug`` the mean of :func:`~reglm.objectives.augmented_loss.augmented_kl`
  against the input embedding at temperature ``tau`` (the ``tau^2 |V|`` factor matches the size
  of its gradient to that of ``J``, eq. 4.3);
* keeps every row of the input embedding at unit L2 norm ("we constrain each row of the input
  embedding matrix to have a norm of 1");
* measures :func:`~reglm.analysis.subspace.embedding_subspace_distance` (appendix B) at the end.

Panel (a) sweeps ``beta`` at ``tau = tau_a`` (10); panel (b) sweeps ``tau`` at ``beta = 1``. The
point ``(beta=1, tau=tau_a)`` belongs to both panels and is trained once per run. Each point is
averaged over ``runs`` repeats (10 in the paper).

Choices where the paper is silent (all are :class:`SubspaceStudySpec` options):

* **Optimizer**: Adam (lr 2e-3, no clipping) by default. The objective's scale varies by orders
  of magnitude across the sweep (``tau^2 |V|`` is 1e4 at ``tau = 1`` and 1.6e7 at ``tau = 40`` on
  PTB); Adam's per-parameter normalization makes one learning rate work for every point, and the
  aim is the lowest training loss, not generalization. Measured on PTB (``beta = 1``,
  ``tau = 10``, 5 epochs): plain SGD never moved the distance off its random value 0.985 --
  with appendix A's lr 1 and clipping at 5 (the clipped steps are tiny), nor unclipped at lr 0.02
  or 0.1 -- and diverged unclipped at lr 1, while Adam brought it to 0.955 (lr 1e-3 and 2e-3
  alike; lr 1e-2 was slower). ``optimizer="sgd"`` remains an option (default lr 1.0, clipping at
  global norm 5).
* **Batch**: 5 streams (114 steps per epoch) rather than 20 (29 steps): the cost per epoch is
  nearly the same (it is dominated by the ``N x V`` products, linear in the tokens), and after 5
  epochs the distance was 0.955 against 0.972 with 20 streams.
* **Constraint**: the unit-norm rows are enforced by projection -- every row of ``L^T`` is divided
  by its norm once at initialization and after every optimizer step (projected gradient
  descent). ``unit_norm=False`` switches it off.
* **Target gradient**: ``y_tilde`` is a constant target (``target_grad=False``, the reading of
  eq. 3.4; see :mod:`reglm.objectives.augmented_loss`).
* **Encoder**: the paper's LSTM is its VD-LSTM baseline (Zaremba et al.'s) without dropout, i.e.
  ``encoder="vd-lstm"`` with probability 0 -- a plain 2-layer LSTM initialized ``U(-0.1, 0.1)``
  (``init_range``); ``encoder="awd-lstm"`` with every dropout 0 is the same LSTM initialized
  ``U(-1/sqrt(H), 1/sqrt(H))``.
* **Output bias**: the output layer has its trained bias (``output_bias=True``); section 4 sets
  ``b = 0``, which ``output_bias=False`` gives (``model.output_bias=false``).
* **Schedule**: ``epochs`` full passes over the slice, ``batch_size`` contiguous streams, windows
  of fixed length ``bptt`` (35, appendix A), the hidden state carried across windows (detached)
  and reset at the start of every epoch; no learning-rate decay.
* **Pairing**: run ``r`` uses seed ``seed + r`` for its slice *and* for the model's
  initialization, so within a run every ``(beta, tau)`` point starts from the same weights on
  the same words: the sweep compares like with like.

Costs and convergence: a step is dominated by the two ``(N, 300) x (300, V)`` products -- logits
and target similarities -- their backward and the softmaxes over ``V``; the default study (11
distinct points x 10 runs) takes many hours on one CPU thread at PTB's ``|V|``
(docs/benchmarks.md, "Measurements behind choices in the code") -- a GPU helps. The distance falls
slowly and then faster: at ``beta = 1``, ``tau = 10`` one run went 0.979 / 0.955 / 0.942 / 0.915 /
0.856 / 0.762 after 1 / 5 / 10 / 15 / 20 / 25 epochs, still falling by 0.02 per epoch, while
``beta = 0`` stays at (slightly above) the random value 0.985. The paper's 0.06 needs longer
training than the default; ``epochs`` is an option, and every training records its per-epoch
curve. With eq. 6.1's ``tau^2 |V|`` the augmented term dominates the gradient already at
``beta = 0.5`` (summed over ``V`` it is about ``sqrt(|V|)`` times the size of ``J``'s): after 20
epochs the training-slice perplexity was about 5,700 at ``beta = 0.5`` against 71-85 at
``beta = 0``, and the distance nearly that of ``beta = 1``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from reglm.analysis.subspace import embedding_subspace_distance
from reglm.config import MAX_SEED, ModelConfig
from reglm.data.windows import StreamPlan, Window
from reglm.encoders.base import EncoderOutput, detach_state
from reglm.errors import ReglmError
from reglm.evaluate.perplexity import perplexity, stream_pass
from reglm.models import LanguageModel
from reglm.objectives.augmented_loss import augmented_kl
from reglm.progress import say, track

OPTIMIZERS = ("adam", "sgd")
ENCODERS = ("vd-lstm", "awd-lstm")
DEFAULT_LR = {"adam": 2e-3, "sgd": 1.0}
"""Learning rate when ``SubspaceStudySpec.lr`` is None."""
DEFAULT_CLIP = {"adam": 0.0, "sgd": 5.0}
"""Gradient-norm clipping when ``SubspaceStudySpec.clip`` is None (0: off); SGD's is appendix A's."""
DEFAULT_EPOCHS = 40
"""Passes over the 20,000-word slice; see the module docstring."""
FLAT_TOLERANCE = 1e-3
"""``until_flat``: the largest relative change of the epoch objective per epoch that counts as flat."""


@dataclass(frozen=True)
class SubspaceStudySpec:
    """Settings of the section-6.2 study; defaults are the paper's where it gives them.

    Validated on construction: a bad value raises :class:`ReglmError` naming the command-line
    option (``--betas``, ``--taus``, ...). ``lr`` and ``clip`` left None are resolved per optimizer.
    """

    words: int = 20_000
    """contiguous training tokens per run (the paper: a random 20,000-word sequence)"""
    hidden: int = 300
    """LSTM units per layer and embedding size (2 layers, the paper: 300)"""
    epochs: int = DEFAULT_EPOCHS
    """passes over the slice per training (not stated in the paper; chosen for the CPU budget, see the README)"""
    batch_size: int = 5
    """contiguous streams the slice is cut into (5: 114 steps per epoch of 20,000 words)"""
    bptt: int = 35
    """truncated-BPTT window (appendix A: 35)"""
    optimizer: str = "adam"
    """adam or sgd (the paper does not say)"""
    lr: float | None = None
    """learning rate; None: 2e-3 for adam, 1.0 for sgd"""
    clip: float | None = None
    """maximum global gradient norm, 0: off; None: off for adam, 5 for sgd (appendix A)"""
    betas: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    """panel (a): proportions beta of the augmented loss, at tau = tau_a"""
    taus: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0)
    """panel (b): temperatures, at beta = 1"""
    tau_a: float = 10.0
    """the temperature of panel (a)"""
    runs: int = 10
    """independent repeats per point (the paper: 10); run r uses seed + r"""
    seed: int = 0
    """base seed of the slices and initializations"""
    target_grad: bool = False
    """let the embedding's gradient flow through y_tilde too (see reglm.objectives.augmented_loss)"""
    unit_norm: bool = True
    """project every input-embedding row to unit L2 norm at init and after every step"""
    output_bias: bool = True
    """the output layer has a trained bias b (False: b = 0, as section 4 assumes)"""
    encoder: str = "vd-lstm"
    """the LSTM: vd-lstm (Inan et al.'s baseline, here without dropout) or awd-lstm (all dropouts 0)"""
    until_flat: int = 0
    """stop a training once its epoch objectives over the last this-many epochs (and the one before
    them) lie within :data:`FLAT_TOLERANCE` per epoch of each other (relative); ``epochs`` is then
    a cap (0: off). The objective first rises under the unit-norm constraint and comes back down,
    so neither the best so far nor two end points alone tell a plateau"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "taus", tuple(float(t) for t in self.taus))
        if self.encoder not in ENCODERS:
            raise ReglmError(f"--encoder: {self.encoder!r} is unknown; choose {' or '.join(ENCODERS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ReglmError(f"--optimizer: {self.optimizer!r} is unknown; choose {' or '.join(OPTIMIZERS)}")
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        if self.clip is None:
            object.__setattr__(self, "clip", DEFAULT_CLIP[self.optimizer])
        for option, value in (
            ("--hidden", self.hidden),
            ("--epochs", self.epochs),
            ("--batch-size", self.batch_size),
            ("--bptt", self.bptt),
            ("--runs", self.runs),
        ):
            if value < 1:
                raise ReglmError(f"{option}: {value} must be >= 1")
        if self.until_flat < 0:
            raise ReglmError(f"--until-flat: {self.until_flat} must be >= 0 (0: train every --epochs)")
        if not 0 <= self.seed <= MAX_SEED - self.runs:
            raise ReglmError(f"--seed: {self.seed} must be in [0, 2^63 - 1 - runs]")
        if not self.betas:
            raise ReglmError("--betas: give at least one proportion beta in [0, 1], e.g. --betas 0,0.5,1")
        bad = [b for b in self.betas if not (math.isfinite(b) and 0.0 <= b <= 1.0)]
        if bad:
            raise ReglmError(f"--betas: {bad} not in [0, 1]; beta is the proportion of the augmented loss")
        if not self.taus:
            raise ReglmError("--taus: give at least one temperature > 0, e.g. --taus 1,10,40")
        bad = [t for t in self.taus if not (math.isfinite(t) and t > 0)]
        if bad:
            raise ReglmError(f"--taus: {bad} must be finite temperatures > 0")
        if not (math.isfinite(self.tau_a) and self.tau_a > 0):
            raise ReglmError(f"--tau-a: {self.tau_a} must be a finite temperature > 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ReglmError(f"--lr: {self.lr} must be a finite number > 0")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ReglmError(f"--clip: {self.clip} must be >= 0 (0: no clipping)")
        if self.words <= self.bptt:
            raise ReglmError(f"--words: {self.words} must exceed --bptt ({self.bptt})")
        if self.words // self.batch_size < self.bptt + 1:
            raise ReglmError(
                f"--words: {self.words} tokens cut into --batch-size {self.batch_size} streams give "
                f"{self.words // self.batch_size} per stream, "
                f"fewer than one window of --bptt {self.bptt} plus its target; give at least "
                f"{self.batch_size * (self.bptt + 1)} words or a smaller batch size"
            )

    def points(self) -> list[tuple[float, float]]:
        """The distinct ``(beta, tau)`` trainings of both panels, panel (a) first."""
        out: list[tuple[float, float]] = []
        for point in [(b, self.tau_a) for b in self.betas] + [(1.0, t) for t in self.taus]:
            if point not in out:
                out.append(point)
        return out

    def to_dict(self) -> dict[str, Any]:
        raw = dataclasses.asdict(self)
        raw["betas"], raw["taus"] = list(self.betas), list(self.taus)
        return raw


def study_model_config(spec: SubspaceStudySpec) -> ModelConfig:
    """The unregularized, untied 2-layer LSTM of section 6.2: ``emb_size = hidden_size = spec.hidden``,
    every dropout the encoder has at 0 (the ``*dropout`` pattern)."""
    return ModelConfig.build(
        encoder=spec.encoder,
        emb_size=spec.hidden,
        hidden_size=spec.hidden,
        num_layers=2,
        tie_weights=False,
        **{"*dropout": 0.0},
        output="softmax",
        output_bias=spec.output_bias,
    )


def study_objective(
    logits: Tensor, targets: Tensor, embedding: Tensor, beta: float, tau: float, target_grad: bool = False
) -> Tensor:
    """Eq. 6.1: ``beta * J_aug * tau^2 * |V| + (1 - beta) * J`` (scalar).

    ``logits: (N, V)``, ``targets: (N,)``, ``embedding: (V, E)`` (the input embedding ``L^T``);
    ``J`` is the mean cross-entropy and ``J_aug`` the mean :func:`augmented_kl`. A term whose
    weight is 0 is not computed.
    """
    total = logits.new_zeros(())
    if beta < 1.0:
        total = total + (1.0 - beta) * F.cross_entropy(logits, targets)
    if beta > 0.0:
        scale = beta * tau * tau * logits.size(-1)
        total = total + scale * augmented_kl(logits, targets, embedding, tau, target_grad).mean()
    return total


@torch.no_grad()
def normalize_rows_(weight: Tensor) -> None:
    """Divide every row of ``weight: (V, E)`` by its L2 norm, in place (an all-zero row stays zero)."""
    weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _slice(train_ids: Tensor, words: int, seed: int) -> tuple[int, Tensor]:
    """A random contiguous ``(words,)`` slice of ``train_ids``, its offset drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, train_ids.numel() - words + 1, (1,), generator=gen))
    return offset, train_ids[offset : offset + words]


def _evaluate(model: LanguageModel, plan: StreamPlan, bptt: int, tau: float) -> dict[str, float]:
    """Mean ``J`` (cross-entropy), its perplexity, and mean ``J_aug`` at ``tau`` over the slice."""

    def per_window(outs: list[EncoderOutput], window: Window) -> dict[str, Tensor]:
        logits = model.output.logits(outs[0].output).reshape(-1, model.vocab_size)
        flat = window.targets.reshape(-1)
        shape = window.targets.shape
        return {
            "nll": F.cross_entropy(logits, flat, reduction="none").view(shape),
            "aug": augmented_kl(logits, flat, model.embedding.weight, tau).view(shape),
        }

    totals = stream_pass([model], plan, bptt, per_window, plan.data.device)
    nll = totals.mean("nll")
    return {"nll": nll, "ppl": perplexity(nll), "aug": totals.mean("aug")}


def train_point(
    plan: StreamPlan,
    vocab_size: int,
    spec: SubspaceStudySpec,
    beta: float,
    tau: float,
    seed: int,
    progress: bool = False,
) -> dict[str, Any]:
    """One training of the study on ``plan`` (the slice's streams, on the target device).

    The model is initialized from ``seed``. Returns ``{"distance", "final": {"nll", "ppl", "aug"},
    "curve": [{"epoch", "objective", "distance"}, ...], "flat", "seconds"}``: the subspace distance
    after training, the training-slice losses of the final weights (``aug`` at ``tau``), per epoch
    the mean eq.-6.1 objective over its steps and the distance at its end, and whether the
    ``until_flat`` rule ended it. ``progress``: a line per epoch.
    """
    began = time.perf_counter()
    device = plan.data.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = LanguageModel(study_model_config(spec), vocab_size).to(device)
    embedding = model.embedding.weight
    if spec.unit_norm:
        normalize_rows_(embedding)
    params = list(model.parameters())
    optimizer: torch.optim.Optimizer
    if spec.optimizer == "adam":
        # the fused kernel (CPU and CUDA) is the same update, a third faster per step on one CPU thread
        optimizer = torch.optim.Adam(params, lr=spec.lr, fused=device.type in ("cpu", "cuda"))
    else:
        optimizer = torch.optim.SGD(params, lr=spec.lr)
    model.train()
    curve = []
    flat = False
    for epoch in range(1, spec.epochs + 1):
        state = model.init_state(plan.batch_size, device)
        total, steps = 0.0, 0
        for window in plan.windows(spec.bptt):
            x, y = window.inputs, window.targets
            out = model(x, state)
            state = detach_state(out.state)
            logits = model.output.logits(out.output).reshape(-1, vocab_size)
            loss = study_objective(logits, y.reshape(-1), embedding, beta, tau, spec.target_grad)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if spec.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, spec.clip)
            optimizer.step()
            if spec.unit_norm:
                normalize_rows_(embedding)
            total += float(loss.detach())
            steps += 1
        curve.append({"epoch": epoch, "objective": total / steps, "distance": embedding_subspace_distance(model)})
        if progress:
            say(
                f"beta {beta:g}, tau {tau:g}, epoch {epoch}: objective {curve[-1]['objective']:.5g}, "
                f"distance {curve[-1]['distance']:.4f}"
            )
        if spec.until_flat and len(curve) > spec.until_flat:
            window = [point["objective"] for point in curve[-1 - spec.until_flat :]]
            flat = max(window) - min(window) <= FLAT_TOLERANCE * spec.until_flat * abs(min(window))
            if flat:
                break
    return {
        "distance": curve[-1]["distance"],
        "final": _evaluate(model, plan, spec.bptt, tau),
        "curve": curve,
        "flat": flat,
        "seconds": time.perf_counter() - began,
    }


def _stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def run_subspace_study(
    train_ids: Tensor,
    vocab_size: int,
    spec: SubspaceStudySpec,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Run the section-6.2 study on the training stream ``train_ids: (N,)`` of a ``vocab_size`` vocabulary.

    For every run ``r`` (seed ``spec.seed + r``: slice and initialization) and every distinct
    ``(beta, tau)`` of :meth:`SubspaceStudySpec.points`, one :func:`train_point`. Returns a
    JSON-able dict:

    * ``spec`` (lr and clip resolved), ``vocab_size``, ``device``, ``torch_threads``, ``seconds``;
    * ``panels``: ``{"beta": {"tau": tau_a, "x": betas, ...}, "tau": {"beta": 1.0, "x": taus, ...}}``,
      each with ``distances`` (per point, the list over runs), ``mean`` and ``std`` (sample
      standard deviation over runs, 0 for one run) and ``final_nll`` / ``final_aug`` (mean over
      runs of the final training-slice losses);
    * ``trainings``: one record per training: ``run``, ``seed``, ``offset`` (of the slice),
      ``beta``, ``tau`` and :func:`train_point`'s ``distance``, ``final``, ``curve``, ``seconds``.

    ``progress`` reports the trainings done (:func:`reglm.progress.track`). Raises :class:`ReglmError` when the stream
    is shorter than ``spec.words`` or holds ids outside the vocabulary.
    """
    began = time.perf_counter()
    if train_ids.dim() != 1:
        raise ValueError(f"expected a 1-D id stream, got shape {tuple(train_ids.shape)}")
    if train_ids.numel() < spec.words:
        raise ReglmError(
            f"--words: {spec.words} exceeds the {train_ids.numel():,} training tokens; give at most {train_ids.numel()}"
        )
    if vocab_size < 2 or int(train_ids.min()) < 0 or int(train_ids.max()) >= vocab_size:
        raise ReglmError(
            f"the training ids must lie in [0, {vocab_size}) for a vocabulary of {vocab_size}; pass the corpus's "
            "own vocabulary size"
        )
    device = torch.device(device)
    points = spec.points()
    trainings: list[dict[str, Any]] = []
    grid = [(run, beta, tau) for run in range(spec.runs) for beta, tau in points]
    plans: dict[int, tuple[int, StreamPlan]] = {}
    for run, beta, tau in track(grid, len(grid), "subspace study", "training", progress):
        seed = spec.seed + run
        if run not in plans:
            offset, ids = _slice(train_ids, spec.words, seed)
            plans = {run: (offset, StreamPlan(ids.to(torch.long), spec.batch_size, "trim").to(device))}
        offset, plan = plans[run]
        record = train_point(plan, vocab_size, spec, beta, tau, seed, progress)
        trainings.append({"run": run, "seed": seed, "offset": offset, "beta": beta, "tau": tau, **record})

    def panel(pairs: list[tuple[float, float]]) -> dict[str, Any]:
        per_point = [[t for t in trainings if (t["beta"], t["tau"]) == p] for p in pairs]
        distances = [[t["distance"] for t in group] for group in per_point]
        stats = [_stats(d) for d in distances]
        return {
            "distances": distances,
            "mean": [m for m, _ in stats],
            "std": [s for _, s in stats],
            "final_nll": [statistics.fmean(t["final"]["nll"] for t in group) for group in per_point],
            "final_aug": [statistics.fmean(t["final"]["aug"] for t in group) for group in per_point],
        }

    return {
        "spec": spec.to_dict(),
        "vocab_size": vocab_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "panels": {
            "beta": {"tau": spec.tau_a, "x": list(spec.betas), **panel([(b, spec.tau_a) for b in spec.betas])},
            "tau": {"beta": 1.0, "x": list(spec.taus), **panel([(1.0, t) for t in spec.taus])},
        },
        "trainings": trainings,
        "seconds": time.perf_counter() - began,
    }
