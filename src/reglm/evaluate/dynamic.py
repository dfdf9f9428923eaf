"""Dynamic evaluation (Krause, Kahembwe, Murray & Renals, 2018, "Dynamic Evaluation of Neural
Sequence Models", ICML): the model keeps learning from the text it is scoring.

The evaluation stream is cut into ``batch_size`` contiguous streams like
:func:`~reglm.evaluate.perplexity.evaluate` and read in segments ``s_1, s_2, ...`` of
``segment`` tokens, the hidden state carried (and detached) from segment to segment. For each
segment the model first *scores* it with its current weights -- those NLLs are what the result
reports, the prediction made before seeing the segment -- then takes the gradient ``g`` of the
segment's mean NLL (over its ``B x T`` tokens) and updates the weights before reading the next
segment.

Update rules (the paper's RMS-normalized update with a global prior, and its plain-SGD
dynamic evaluation with the same decay; ``theta_0`` are the trained weights)::

    rms:  theta <- theta - lr * g / (R + eps) + min(1, lam * R / mean(R)) * (theta_0 - theta)
    sgd:  theta <- theta - lr * g + lam * (theta_0 - theta)

elementwise, where ``R = sqrt(MS)`` is the root mean square of the gradient of every parameter
element over a pass on the training data (:func:`gradient_statistics`:
``MS = (1 / N_b) sum_k g_k^2`` over ``N_b`` training batches). The decay toward ``theta_0`` is
scaled per element by ``R / mean(R)`` (the paper's ``RMS_norm``: larger decay where the
gradient is usually large) and the scaled rate ``lam * R / mean(R)`` is clipped at 1 so the
decay never overshoots ``theta_0`` (the reference code clips ``R / mean(R)`` at ``1 / lam``,
the same thing). ``sgd`` is plain SGD dynamic evaluation with a uniform decay ``lam`` toward
``theta_0``; it needs no statistics pass.

Choices, and where they come from (reference: ``benkrause/dynamic-evaluation``
``dynamiceval.py``, the current version, which follows the paper's equations; the MoS and
adversarial-softmax repositories ship the older version, see below):

* **Statistics.** Gradient of the mean NLL of windows of ``stats_batch_size = 100`` streams x
  ``segment = 5`` tokens of the training split, batchified like training (so the windows start
  at 100 places spread over the corpus), hidden state carried, every dropout off. The
  reference uses its single ``--bptt`` for both passes; :func:`gradient_statistics` does too
  unless given another ``bptt``. ``max_train_tokens`` caps the pass at its first
  ``max(1, max_train_tokens // (stats_batch_size * bptt))`` windows; the default ``None``
  reads the whole split, as the reference's ``--max_batches -1``.
* **mean(R)** is the mean over parameter tensors of each tensor's mean ``R`` (the reference's
  ``gsum / count``), not the mean over all elements; a tied embedding/softmax matrix is one
  tensor and counted once.
* **Defaults** are the reference's, tuned for AWD-LSTM on PTB: ``lr = 5e-5``, ``lam = 0.002``,
  ``eps = 2e-5``, ``segment = 5``, evaluation with batch size 1, statistics with batch size
  100 over the whole training split. The reference tunes only the RMS rule, so ``sgd`` has no
  default learning rate: it must be given.
* **Older hyperparameters.** The MoS (``zihangdai/mos``) and AdvSoft (``ChengyueGongR/advsoft``)
  scripts use ``R' = sqrt(sum_k g_k^2)`` and divide by the *sum* over tensors of the mean
  ``R'``; their ``lr = 0.002, lambda = 0.02 (0.075 for MoS on PTB), epsilon = 0.001`` translate
  to this module's rule as ``lr / sqrt(N_b)``, ``lambda / n_tensors``, ``epsilon / sqrt(N_b)``
  (``N_b`` statistics batches, ``n_tensors`` parameter tensors; the reference's
  ``--oldhyper``).
* **Scoring.** Every target is scored exactly once, before the update that uses it; the total
  is ``sum NLL / number of targets`` like :func:`~reglm.evaluate.perplexity.evaluate` (the
  reference weights the last, shorter segment by its length, which is the same). The first
  token of each stream is not scored.
* **Dropout.** Gradients are taken with every dropout off: the model is in eval mode
  (embedding dropout, locked dropout and input noise off) and every
  :class:`~reglm.encoders.awd_lstm.WeightDropLSTM` runs with ``weight_dropout = 0`` (a VD-LSTM
  encoder in eval mode draws no masks). Those
  layers alone are switched to training mode, because the cuDNN LSTM kernel can only be
  differentiated when run in training mode; with no DropConnect and a single-layer kernel
  training mode computes exactly what eval mode computes.
* **Isolation.** All work happens on a deep copy of the model on ``device``; the caller's model
  (weights, mode, gradients) is never touched. :class:`DynamicEvaluator` keeps ``theta_0`` and
  puts the copy back to it after every pass, so one copy serves a whole grid search.
* **Search** (:func:`dynamic_search`): every ``(lr, lam)`` of a :class:`DynamicGrid`, each a
  full dynamic pass on the validation ids, the lowest loss kept (the first on ties). The default
  grid (:meth:`DynamicGrid.around`) is the reference's ``--grid``,
  ``lr x {0.6, 0.8, 1, 1.2, 1.4, 2}`` and ``lam x {0.5, 1, 1.5, 2.5}`` around the spec's values:
  with the default spec exactly the reference's ``{3, 4, 5, 6, 7, 10}e-5`` and
  ``{0.001, 0.002, 0.003, 0.005}``. The reference rescales its fixed grid by ``segment / 5``;
  ours follows the spec's ``lr`` and ``lam`` instead. (The reference's ``--gridfast`` searches
  on the first 30,000 validation tokens; pass such a slice as the validation ids.)

Speed: per segment one forward, one ``torch.autograd.grad`` and two multi-tensor
(``torch._foreach_*``) updates over the adapted parameters -- ``lerp`` toward ``theta_0`` by
the per-element decay, then ``addcmul`` of the gradient by the per-element step
``lr / (R + eps)``, both precomputed once per spec. No Python loop over parameters.

* On the CPU each LSTM layer is differentiated by
  :class:`~reglm.encoders.lstm_segment.SegmentLSTM` (the layers' ``gradient_mode()``): it keeps
  the gates of the forward pass and computes each weight gradient of the segment as one matrix
  product ``dG^T X``, where PyTorch's CPU LSTM backward writes a full ``4H x H`` gradient per time
  step (a rank-1 product each) and sums them. The forward values are those of PyTorch's own
  kernel; the gradients equal autograd's to rounding (tested in float64).
* The input embedding's lookup gradient is sparse (its ``gradient_mode()``), so no dense
  ``(V, E)`` zero matrix is written for it; autograd adds its rows to a tied output layer's dense
  gradient, and an untied one is made dense once.
* Gradients come from ``torch.autograd.grad``, which hands over the freshly computed tensors:
  accumulating into reused ``.grad`` buffers adds a zeroing and an addition pass over every
  parameter and was measurably slower per segment (docs/benchmarks.md, "Measurements behind
  choices in the code").
* The update stays two passes: no stock multi-tensor operation combines a per-element decay
  toward ``theta_0`` with a per-element gradient step, and a single pass would still read five
  tensors and write one (six tensor streams against eight).
* ``adapt=output`` adapts only the output layer (with a tied embedding, that matrix and the
  bias): the encoder runs without gradients, so the backward pass and most of the update go.
  That is not the paper's method (it adapts every parameter) and its effect on perplexity was
  not measured here.

Measured costs, the floor at the reference's segment length and what lowers it are in
``docs/benchmarks.md`` (``benchmarks/dynamic_eval.py``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from reglm.data.windows import StreamPlan, Window
from reglm.encoders.base import State, detach_state
from reglm.evaluate.dynamic_spec import OPTION, DynamicGrid, DynamicSpec, train_split_error
from reglm.evaluate.perplexity import EvalResult, in_stream_order
from reglm.progress import track


def _gradient_copy(
    model: nn.Module, device: torch.device | str, adapt: str = "all"
) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """A deep copy of ``model`` on ``device`` that takes gradients with every dropout off: eval
    mode, then every component's ``gradient_mode()`` (the recurrent layers': cuDNN
    backpropagates only in training mode) switched to it. Returns it with its adapted
    ``(name, parameter)`` pairs (``adapt``: every parameter, or the output layer's), the only
    ones that require gradients."""
    work = copy.deepcopy(model).to(device)
    work.eval()
    work.gradient_mode()
    named = list(work.named_parameters())
    if adapt == "output":
        output = {id(p) for p in work.output.parameters()}
        named = [(name, p) for name, p in named if id(p) in output]
    for param in work.parameters():
        param.requires_grad_(False)
        param.grad = None
    for _, param in named:
        param.requires_grad_(True)
    return work, named


def segment_loss(
    model: nn.Module, window: Window, state: State | None, encoder_grad: bool = True
) -> tuple[Tensor, Tensor, State | None]:
    """The forward pass of one segment with gradients on (through the output layer only when not
    ``encoder_grad``): (NLL ``(B, T)``, the mean NLL of its scored targets, the new state)."""
    with torch.set_grad_enabled(encoder_grad):
        out = model(window.inputs, state)
    with torch.enable_grad():
        nll = model.output.nll(out, window.targets)
        loss = nll.mean() if window.scored is None else nll.masked_fill(~window.scored, 0).sum() / window.tokens
    return nll, loss, out.state


def segment_gradients(loss: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    """The gradient of ``loss`` for every parameter, dense (zeros for an unused one); an untied
    embedding's sparse lookup gradient is made dense here, a tied one arrives summed into the
    output layer's dense gradient."""
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return tuple(g.to_dense() if g.is_sparse else g for g in grads)


def _segment_grads(
    model: nn.Module, params: list[Tensor], window: Window, state: State | None, encoder_grad: bool = True
) -> tuple[Tensor, tuple[Tensor, ...], State | None]:
    """Score the window and differentiate the mean NLL of its scored targets: (NLL ``(B, T)``,
    one gradient per parameter, detached new state)."""
    nll, loss, state = segment_loss(model, window, state, encoder_grad)
    return nll.detach(), segment_gradients(loss, params), detach_state(state)


def gradient_statistics(
    model: nn.Module,
    train_ids: Tensor | None,
    spec: DynamicSpec,
    bptt: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "gradient statistics",
) -> dict[str, Tensor]:
    """Per-element gradient RMS ``R = sqrt(mean_k g_k^2)`` of every parameter of ``model``, keyed
    by ``named_parameters()`` names (a tied matrix once), on ``device``.

    ``train_ids: (N,)`` is batchified into ``spec.stats_batch_size`` streams and read in windows
    of ``bptt`` tokens (default ``spec.segment``), hidden state carried; ``g_k`` is the gradient
    of window ``k``'s mean NLL with every dropout off. Windows start at every multiple of the
    window below ``L - 2`` (``L`` the stream length), the reference's ``while i < L - 1 - 1``: a
    last window of a single target is never read. At most
    ``max(1, spec.max_train_tokens // (stats_batch_size * bptt))`` windows are read (all with
    ``max_train_tokens=None``). ``model`` itself is left untouched.
    """
    train_split_error(train_ids, spec, bptt, OPTION)
    window = bptt or spec.segment
    work, named = _gradient_copy(model, device, spec.adapt)
    names, params = [name for name, _ in named], [p for _, p in named]
    plan = StreamPlan(train_ids, spec.stats_batch_size, "trim").to(device)
    starts = range(0, plan.columns - 1, window)
    if spec.max_train_tokens is not None:
        starts = starts[: max(1, spec.max_train_tokens // (plan.batch_size * window))]
    square_sums = [torch.zeros_like(p) for p in params]
    state = work.init_state(plan.batch_size, device=device)
    for start in track(starts, len(starts), desc, "batch", progress):
        _, grads, state = _segment_grads(
            work, params, plan.window(start, window), state, encoder_grad=spec.adapt == "all"
        )
        torch._foreach_addcmul_(square_sums, grads, grads)
    return {name: s.div_(len(starts)).sqrt_() for name, s in zip(names, square_sums)}


class DynamicEvaluator:
    """A working copy of ``model`` that adapts while it scores, and the trained weights
    ``theta_0`` it decays toward and returns to after every pass.

    ``adapt`` (a spec's ``adapt``) names the parameters it adapts: ``all``, or the ``output``
    layer's (the encoder then runs without gradients; a spec with another ``adapt`` is refused).
    ``stats`` (from :func:`gradient_statistics` on the same model and ``adapt``) is needed for
    ``rms`` specs only. The per-element coefficients of a spec (decay ``min(1, lam R / mean R)`` and step
    ``lr / (R + eps)``) are computed once and kept for the next segments.
    """

    def __init__(
        self,
        model: nn.Module,
        stats: dict[str, Tensor] | None = None,
        device: torch.device | str = "cpu",
        adapt: str = "all",
    ) -> None:
        self.device = torch.device(device)
        self.scope = adapt
        self.model, named = _gradient_copy(model, self.device, adapt)
        self.params = [p for _, p in named]
        self.theta0 = [p.detach().clone() for p in self.params]
        self.rms: list[Tensor] | None = None
        if stats is not None:
            missing = [name for name, _ in named if name not in stats]
            if missing:
                raise ValueError(f"gradient statistics lack parameters {missing}; compute them on this model")
            self.rms = [stats[name].to(device=self.device, dtype=p.dtype) for name, p in named]
        self._rule: tuple[tuple, list[Tensor] | float, list[Tensor] | float] | None = None

    def _coefficients(self, spec: DynamicSpec) -> tuple[list[Tensor] | float, list[Tensor] | float]:
        """(decay, step) of ``spec``: per-element tensor lists for ``rms``, scalars for ``sgd``."""
        key = (spec.variant, spec.lr, spec.lam, spec.eps)
        if self._rule is None or self._rule[0] != key:
            if spec.variant == "sgd":
                decay, step = spec.lam, spec.lr
            else:
                if self.rms is None:
                    raise ValueError("variant=rms needs gradient statistics: pass stats from gradient_statistics()")
                mean = torch.stack([r.mean() for r in self.rms]).mean()
                decay = [(spec.lam * r / mean).clamp_(max=1.0) for r in self.rms]
                step = [(r + spec.eps).reciprocal_().mul_(spec.lr) for r in self.rms]
            self._rule = (key, decay, step)
        return self._rule[1], self._rule[2]

    @torch.no_grad()
    def reset(self) -> None:
        """Put the working copy back to the trained weights ``theta_0``."""
        for p, p0 in zip(self.params, self.theta0):
            p.copy_(p0)

    def adapt(self, window: Window, state: State | None, spec: DynamicSpec) -> tuple[Tensor, State | None]:
        """Score the segment with the current weights, then update them on its scored targets.
        Returns the NLL ``(B, T)`` of the prediction made *before* the update and the detached
        state to pass with the next segment."""
        if spec.adapt != self.scope:
            raise ValueError(f"this evaluator adapts {self.scope!r} parameters, the spec asks for adapt={spec.adapt!r}")
        nll, grads, state = _segment_grads(self.model, self.params, window, state, encoder_grad=self.scope == "all")
        self.update(grads, spec)
        return nll, state

    @torch.no_grad()
    def update(self, grads: tuple[Tensor, ...], spec: DynamicSpec) -> None:
        """One update of every parameter by its gradient (the rule of the module doc), two
        multi-tensor passes: the decay toward ``theta_0``, then the gradient step."""
        decay, step = self._coefficients(spec)
        torch._foreach_lerp_(self.params, self.theta0, decay)
        if spec.variant == "sgd":
            torch._foreach_add_(self.params, grads, alpha=-step)
        else:
            torch._foreach_addcmul_(self.params, grads, step, value=-1.0)

    def evaluate(
        self,
        ids: Tensor,
        spec: DynamicSpec,
        keep_token_nll: bool = False,
        progress: bool = False,
        desc: str = "dynamic",
    ) -> EvalResult:
        """One dynamic pass over ``ids: (N,)`` cut into ``spec.batch_size`` streams (every target
        once, :class:`~reglm.data.windows.StreamPlan`), in segments of ``spec.segment`` tokens;
        the weights are back at ``theta_0`` afterwards. ``token_nll``/``positions`` as
        :func:`~reglm.evaluate.perplexity.evaluate` gives them."""
        plan = StreamPlan(ids, spec.batch_size, "all").to(self.device)
        state = self.model.init_state(plan.batch_size, device=self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0
        pieces = []
        try:
            for window in track(plan.windows(spec.segment), plan.count(spec.segment), desc, "segment", progress):
                nll, state = self.adapt(window, state, spec)
                total += window.masked_sum(nll)
                count += window.tokens
                if keep_token_nll:
                    pieces.append(window.scored_values(nll))
        finally:
            self.reset()
        result = EvalResult(loss=float(total) / max(count, 1), tokens=count)
        if keep_token_nll:
            result.positions, result.token_nll = in_stream_order(pieces)
        return result


def dynamic_evaluate(
    model: nn.Module,
    ids: Tensor,
    spec: DynamicSpec,
    stats: dict[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    keep_token_nll: bool = False,
    progress: bool = False,
    desc: str = "dynamic",
) -> EvalResult:
    """Dynamically evaluate ``model`` on ``ids: (N,)`` (see the module doc); ``stats`` from
    :func:`gradient_statistics` for ``spec.variant == "rms"``. ``model`` is left unchanged."""
    return DynamicEvaluator(model, stats, device, spec.adapt).evaluate(ids, spec, keep_token_nll, progress, desc)


@dataclass
class SearchResult:
    """Outcome of :func:`dynamic_search`: the best spec on the validation ids, its result, and
    every grid point in the order evaluated (lambda outer, lr inner)."""

    best: DynamicSpec
    best_result: EvalResult
    results: list[tuple[DynamicSpec, EvalResult]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "best": {**self.best.as_dict(), **self.best_result.as_dict()},
            "results": [{"lr": s.lr, "lambda": s.lam, **r.as_dict()} for s, r in self.results],
        }


def dynamic_search(
    model: nn.Module,
    valid_ids: Tensor,
    grid: DynamicGrid,
    stats: dict[str, Tensor] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SearchResult:
    """Every ``(lr, lambda)`` of ``grid`` (with ``grid.spec``'s other settings) by dynamic
    evaluation on ``valid_ids: (N,)``, all on one working copy of ``model``; the best is the
    lowest loss (the first in grid order on a tie). ``stats`` as for :func:`dynamic_evaluate`."""
    evaluator = DynamicEvaluator(model, stats, device, grid.spec.adapt)
    specs = grid.specs()
    results = []
    for i, spec in enumerate(specs):
        desc = f"search {i + 1}/{len(specs)} lr={spec.lr:.3g} lambda={spec.lam:.3g}"
        results.append((spec, evaluator.evaluate(valid_ids, spec, progress=progress, desc=desc)))
    best, best_result = min(results, key=lambda item: item[1].loss)
    return SearchResult(best=best, best_result=best_result, results=results)
