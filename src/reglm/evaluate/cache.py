"""The continuous cache pointer at evaluation time (Grave et al. 2017; AWD-LSTM section 7).

A trained model is mixed with a cache of its own recent final-layer hidden states. At position
``t`` of a stream, with ``h_t`` the last encoder layer's output (``EncoderOutput.output``,
undropped in eval mode) and ``x_{t+1}`` the word to predict::

    p_cache(w) = sum_{i in C_t, x_{i+1} = w} softmax_{i in C_t}(theta * h_t . h_i)
    p(w)       = (1 - lambda) * p_model(w) + lambda * p_cache(w)

``C_t = {i : t - W <= i <= t - 1}`` (and ``i >= 0``): the cache holds the pairs ``(h_i,
x_{i+1})`` of the ``W`` positions before ``t``, whose next words ``x_{i+1}``, ``i + 1 <= t``, have
been read already; ``h_t`` itself is not in it (Grave et al., eq. 2). Choices:

* **Streams and windows.** The split is cut into streams and bptt windows exactly as
  :func:`reglm.evaluate.perplexity.evaluate` cuts it, so ``lambda = 0`` gives the same per-token
  NLL and the same total, bit for bit. The cache is a sliding window over the *stream*: it
  carries the last ``W`` positions across bptt windows. Each of ``B`` streams has its own cache.
  One stream (``B = 1``) is the default, as in the paper's test evaluation.
* **Start of a split.** Position ``t < W`` uses the ``t`` pairs it has. Position 0 has none; there
  ``p = p_model`` (the weight ``lambda`` falls back to the model). The reference code instead
  uses the model alone for the first ``W + 1`` positions of a split.
* **Ranges.** ``W >= 1`` (integer), ``theta >= 0`` (``theta = 0``: uniform attention over the
  cache), ``0 <= lambda <= 1`` (``lambda = 1`` gives an infinite loss whenever the target is
  not in the cache).
* **Paper values** (window, theta, lambda): PTB (2000, 1.0, 0.1), WikiText-2 (3785, 0.662,
  0.1279) -- the text lists them as (window, lambda, theta); the reference code's WikiText-2
  defaults fix which number is which. ``--cache`` without a value uses the PTB values.

Vectorized: per bptt window of ``T`` positions, the last ``W`` states ``(B, W, E)`` and their
next-word ids ``(B, W)`` are concatenated with the window's own, one batched matrix product gives
every score ``(B, T, W + T)``, a causal band mask (an additive -inf bias) keeps the ``W``
entries before each position, and one softmax gives the attention. The loss needs only the
target's probability: ``p_cache(x_{t+1})`` is the attention on the entries whose next word is
the target (an equality mask against the stored ids), and the mixture is formed in log space,
``-log p = -logaddexp(log(1 - lambda) - nll_model, log(lambda) + log p_cache)``, so a tiny
``p_model`` never underflows. Memory ``O(B T (W + T))``; no per-token Python loop and no
vocabulary-sized tensor beyond the model's own. :func:`cache_distribution` gives the full
``(B, T, V)`` mixture by scattering the attention weights into the vocabulary.

:func:`cache_search` tunes ``(W, theta, lambda)`` on validation in one pass: the model runs once,
the scores of each bptt window are computed once for the largest ``W``, each ``W`` redoes only
the masked softmax (for all thetas at once), and each ``lambda`` only the mixture.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from reglm.config.parse import SpecError, spec_items, spec_value, under_option
from reglm.data.windows import StreamPlan, Window
from reglm.encoders.base import EncoderOutput
from reglm.evaluate.perplexity import EvalResult, perplexity, stream_pass, totals_result

KEYS = {"window": "window", "theta": "theta", "lambda": "lam"}
"""spec key -> :class:`CacheSpec` field"""


def _check(key: str, value: float) -> None:
    """A :class:`SpecError` when ``key=value`` is out of range."""
    if key == "window" and not (isinstance(value, int) and value >= 1):
        raise SpecError(
            f"window={value} must be an integer >= 1 (the number of past positions the cache holds, e.g. window=2000)"
        )
    if key == "theta" and not (math.isfinite(value) and value >= 0):
        raise SpecError(
            f"theta={value} must be a finite number >= 0 (the flatness of the cache attention, e.g. theta=1.0)"
        )
    if key == "lambda" and not 0 <= value <= 1:
        raise SpecError(f"lambda={value} must be in [0, 1] (the weight of the cache in the mixture, e.g. lambda=0.1)")


@dataclass(frozen=True)
class CacheSpec:
    """Cache settings: ``window`` W >= 1 past positions, attention flatness ``theta`` >= 0,
    mixture weight ``lam`` in [0, 1] (the spec key is ``lambda``)."""

    window: int
    theta: float
    lam: float

    def __post_init__(self) -> None:
        for key, name in KEYS.items():
            _check(key, getattr(self, name))

    def as_dict(self) -> dict[str, float | int]:
        return {"window": self.window, "theta": self.theta, "lambda": self.lam}

    def __str__(self) -> str:
        return f"window={self.window},theta={self.theta},lambda={self.lam}"


PAPER_SPECS = {"ptb": CacheSpec(2000, 1.0, 0.1), "wikitext-2": CacheSpec(3785, 0.662, 0.1279)}
"""The AWD-LSTM paper's tuned values (section 7)."""
DEFAULT_SPEC = PAPER_SPECS["ptb"]
"""What ``--cache`` uses for a key it is not given."""


def parse_cache_spec(text: str, option: str = "--cache") -> CacheSpec:
    """``"window=2000,theta=1.0,lambda=0.1"`` (any order; a missing key takes its
    :data:`DEFAULT_SPEC` value; ``""`` gives :data:`DEFAULT_SPEC`) -> :class:`CacheSpec`.

    Raises :class:`ReglmError` naming ``option`` and the bad field.
    """

    def build() -> CacheSpec:
        values = dataclasses.asdict(DEFAULT_SPEC)
        if text.strip():
            for name, (key, value) in spec_items(text, option, KEYS, ",", "window=2000,theta=1.0,lambda=0.1").items():
                values[name] = spec_value(CacheSpec, name, key, value, option)
        return CacheSpec(**values)

    return under_option(option, build)


@dataclass(frozen=True)
class CacheGrid:
    """The values :func:`cache_search` tries: every combination of ``windows``, ``thetas``, ``lams``."""

    windows: tuple[int, ...]
    thetas: tuple[float, ...]
    lams: tuple[float, ...]

    def __post_init__(self) -> None:
        for key, values in (("window", self.windows), ("theta", self.thetas), ("lambda", self.lams)):
            if not values:
                raise SpecError(f"no {key} values")
            for value in values:
                _check(key, value)

    def __len__(self) -> int:
        return len(self.windows) * len(self.thetas) * len(self.lams)

    def as_dict(self) -> dict[str, list[float]]:
        return {"window": list(self.windows), "theta": list(self.thetas), "lambda": list(self.lams)}


DEFAULT_GRID = CacheGrid(
    windows=(100, 500, 1000, 2000, 3785), thetas=(0.1, 0.3, 0.662, 1.0), lams=(0.05, 0.1, 0.1279, 0.2, 0.3)
)
"""``--cache-search`` without a value: 100 settings around both papers' values."""


def parse_cache_grid(text: str, option: str = "--cache-search") -> CacheGrid:
    """``"window=500,2000;theta=0.1,0.3;lambda=0.05,0.1"`` -> :class:`CacheGrid`: groups separated
    by ``;``, values by ``,``; a missing key (or ``""``) takes the :data:`DEFAULT_GRID` values;
    repeated values count once. Raises :class:`ReglmError` naming ``option`` and the bad field."""

    def build() -> CacheGrid:
        values = {"window": DEFAULT_GRID.windows, "theta": DEFAULT_GRID.thetas, "lam": DEFAULT_GRID.lams}
        if text.strip():
            for name, (key, items) in spec_items(
                text, option, KEYS, ";", "window=500,2000;theta=0.1,0.3;lambda=0.05,0.1"
            ).items():
                values[name] = tuple(
                    dict.fromkeys(spec_value(CacheSpec, name, key, item.strip(), option) for item in items.split(","))
                )
        return CacheGrid(windows=values["window"], thetas=values["theta"], lams=values["lam"])

    return under_option(option, build)


@dataclass
class CacheResult(EvalResult):
    """:class:`EvalResult` of the cache mixture (its ``token_nll`` are the mixture's), with the
    settings and the model alone on the same targets."""

    spec: CacheSpec | None = None
    plain: EvalResult | None = None
    """the model without the cache on the same targets: what :func:`evaluate` returns"""

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = dict(super().as_dict())
        if self.spec is not None:
            out["cache"] = self.spec.as_dict()
        if self.plain is not None:
            out["model_loss"] = self.plain.loss
            out["model_ppl"] = self.plain.ppl
        return out


@dataclass
class CacheSearch:
    """What :func:`cache_search` found: the best setting and every grid point's loss."""

    best: CacheSpec
    loss: float
    """mean NLL of ``best`` on the searched split"""
    model_loss: float
    """mean NLL of the model alone on the same targets"""
    tokens: int
    results: list[dict[str, float]]
    """per grid point: window, theta, lambda, loss, ppl (grid order: window, theta, lambda)"""

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)

    @property
    def model_ppl(self) -> float:
        return perplexity(self.model_loss)

    def as_dict(self) -> dict[str, object]:
        return {
            "best": self.best.as_dict(),
            "loss": self.loss,
            "ppl": self.ppl,
            "model_loss": self.model_loss,
            "model_ppl": self.model_ppl,
            "tokens": self.tokens,
            "results": self.results,
        }


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def band_mask(queries: int, history: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """``(T, M + T)`` bool: query ``t`` (position ``M + t`` of the keys) may attend key ``k`` iff
    ``1 <= M + t - k <= window``, i.e. the ``window`` positions before it."""
    gap = (
        history
        + torch.arange(queries, device=device).unsqueeze(1)
        - torch.arange(history + queries, device=device).unsqueeze(0)
    )
    return (gap >= 1) & (gap <= window)


@functools.lru_cache(maxsize=16)
def _band_bias(queries: int, history: int, window: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """:func:`band_mask` as an additive ``(T, M + T)`` bias: 0 where allowed, -inf elsewhere
    (memoized: every full-window bptt window of a pass has the same one)."""
    return torch.zeros(queries, history + queries, device=device, dtype=dtype).masked_fill_(
        ~band_mask(queries, history, window, device), -math.inf
    )


def cache_nll(
    states: Tensor,
    next_ids: Tensor,
    history: int,
    nll_model: Tensor,
    windows: Sequence[int],
    thetas: Tensor,
    lams: Tensor,
) -> Tensor:
    """Per-token NLL of the cache mixture for one bptt window and every grid point.

    ``states: (B, M + T, E)``: the ``M = history`` cached final-layer states (``M`` at most
    ``max(windows)``), then the window's ``T`` own; ``next_ids: (B, M + T)`` the word that followed
    each state (for the window: its targets); ``nll_model: (B, T)`` the model's NLL of the
    targets. ``thetas: (nθ,)``, ``lams: (nλ,)`` on the states' device and dtype. Returns
    ``(nW, nθ, nλ, B, T)``; a position with an empty cache gets ``nll_model``.

    Per window size: the scores of the allowed entries, one softmax, and ``p_cache`` of the
    target as the attention on the entries whose next word is the target.
    """
    queries = nll_model.size(1)
    dots = torch.bmm(states[:, history:], states.transpose(1, 2))
    match = (next_ids.unsqueeze(1) == next_ids[:, history:].unsqueeze(2)).to(states.dtype)
    keep = torch.log1p(-lams).view(1, -1, 1, 1)
    use = torch.log(lams).view(1, -1, 1, 1)
    out = []
    for window in windows:
        kept = min(history, window)
        cut = history - kept
        bias = _band_bias(queries, kept, window, states.device, states.dtype)
        attention = torch.softmax(thetas.view(-1, 1, 1, 1) * dots[:, :, cut:] + bias, dim=-1)
        log_cache = (attention * match[:, :, cut:]).sum(-1).log()
        mixed = -torch.logaddexp(keep - nll_model, use + log_cache.unsqueeze(1))
        has_cache = torch.arange(kept, kept + queries, device=states.device) >= 1
        out.append(torch.where(has_cache, mixed, nll_model))
    return torch.stack(out)


class _CacheWindows:
    """A :func:`~reglm.evaluate.perplexity.stream_pass` callback: per window, the model's NLL
    ``(B, T)`` and the cache mixture's for every grid point ``(nW, nθ, nλ, B, T)``, keeping the
    last ``max(windows)`` positions of every stream as the cache."""

    def __init__(
        self, model: torch.nn.Module, windows: Sequence[int], thetas: Sequence[float], lams: Sequence[float]
    ) -> None:
        self.model, self.windows, self.thetas, self.lams = model, list(windows), thetas, lams
        self.keep = max(windows)
        self.past_h: Tensor | None = None
        self.past_y: Tensor | None = None

    def __call__(self, outs: list[EncoderOutput], window: Window) -> dict[str, Tensor]:
        out, y = outs[0], window.targets
        nll_model = self.model.output.nll(out, y)
        h = out.output
        if self.past_h is None or self.past_y is None:
            self.past_h, self.past_y = h[:, :0], y[:, :0]
            self.theta_t = torch.tensor(self.thetas, dtype=h.dtype, device=h.device)
            self.lam_t = torch.tensor(self.lams, dtype=h.dtype, device=h.device)
        states, next_ids = torch.cat([self.past_h, h], dim=1), torch.cat([self.past_y, y], dim=1)
        nll = cache_nll(states, next_ids, self.past_h.size(1), nll_model, self.windows, self.theta_t, self.lam_t)
        self.past_h, self.past_y = states[:, -self.keep :], next_ids[:, -self.keep :]
        return {"model": nll_model, "cache": nll}


@torch.no_grad()
def cache_evaluate(
    model: torch.nn.Module,
    ids: Tensor,
    spec: CacheSpec,
    batch_size: int = 1,
    bptt: int = 70,
    device: torch.device | str = "cpu",
    keep_token_nll: bool = False,
    progress: bool = False,
    desc: str = "cache",
) -> CacheResult:
    """Score ``ids`` (N,) with ``model`` mixed with the cache ``spec``: one full pass.

    Streams and windows as :func:`evaluate`; ``result.plain`` is the model alone on the same
    targets (equal to :func:`evaluate`'s result). With ``keep_token_nll`` both results carry
    ``token_nll`` and ``positions`` of every target.
    """
    step = _CacheWindows(model, [spec.window], [spec.theta], [spec.lam])

    def per_window(outs: list[EncoderOutput], window: Window) -> dict[str, Tensor]:
        values = step(outs, window)
        return {"model": values["model"], "mixed": values["cache"][0, 0, 0]}

    totals = stream_pass(
        [model],
        StreamPlan(ids, batch_size, "all"),
        bptt,
        per_window,
        device,
        progress,
        desc,
        ("model", "mixed") if keep_token_nll else (),
    )
    plain = totals_result(totals, "model")
    mixed = totals_result(totals, "mixed")
    return CacheResult(
        loss=mixed.loss,
        tokens=mixed.tokens,
        token_nll=mixed.token_nll,
        positions=mixed.positions,
        spec=spec,
        plain=plain,
    )


@torch.no_grad()
def cache_search(
    model: torch.nn.Module,
    ids: Tensor,
    grid: CacheGrid = DEFAULT_GRID,
    batch_size: int = 1,
    bptt: int = 70,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "cache search",
) -> CacheSearch:
    """Every setting of ``grid`` on ``ids`` (the validation split) in one pass; the best is the
    lowest mean NLL (the first in grid order on a tie).

    Cost: one model pass, one score product per bptt window for the largest window, then per
    window size a masked softmax for all thetas at once and the mixture for all lambdas.
    Memory per window size ``O(nθ B T (W + T))``.
    """
    step = _CacheWindows(model, grid.windows, grid.thetas, grid.lams)
    totals = stream_pass([model], StreamPlan(ids, batch_size, "all"), bptt, step, device, progress, desc)
    losses = totals.means["cache"].cpu()
    results = [
        {
            "window": w,
            "theta": theta,
            "lambda": lam,
            "loss": float(losses[i, j, k]),
            "ppl": perplexity(float(losses[i, j, k])),
        }
        for i, w in enumerate(grid.windows)
        for j, theta in enumerate(grid.thetas)
        for k, lam in enumerate(grid.lams)
    ]
    best = min(range(len(results)), key=lambda n: results[n]["loss"])
    spec = CacheSpec(results[best]["window"], results[best]["theta"], results[best]["lambda"])
    return CacheSearch(
        best=spec, loss=results[best]["loss"], model_loss=totals.mean("model"), tokens=totals.tokens, results=results
    )


def cache_distribution(log_p_model: Tensor, states: Tensor, next_ids: Tensor, history: int, spec: CacheSpec) -> Tensor:
    """The full next-word log-probabilities ``(B, T, V)`` of the cache mixture for one window.

    ``log_p_model: (B, T, V)`` the model's log-probabilities at the window's ``T`` positions;
    ``states: (B, M + T, E)``: the ``M = history`` cached states, then the window's own;
    ``next_ids: (B, M + T)`` the word that followed each state. The attention weights are
    scattered into the vocabulary at the next-word ids (``p_cache``) and mixed with the model,
    ``log((1 - lambda) p_model + lambda p_cache)`` by ``logaddexp``; a position with an empty
    cache keeps ``log_p_model``. Memory ``O(B T (M + T) + B T V)``.
    """
    queries = log_p_model.size(1)
    allowed = band_mask(queries, history, spec.window, states.device)
    scores = spec.theta * torch.bmm(states[:, history:], states.transpose(1, 2))
    attention = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1).nan_to_num(0.0)
    index = next_ids.unsqueeze(1).expand(-1, queries, -1)
    p_cache = torch.zeros_like(log_p_model).scatter_add_(2, index, attention)
    mixed = torch.logaddexp(_log(1 - spec.lam) + log_p_model, _log(spec.lam) + p_cache.log())
    return torch.where(allowed.any(-1).unsqueeze(-1), mixed, log_p_model)
