"""Inference-only modules rebuilt from a trained :class:`~reglm.models.LanguageModel`.

The exporters and the int8 quantizer do not read reglm's training modules: those carry dropout,
DropConnect and AdvSoft switches, and their LSTM layers call ``torch.lstm`` with an explicit
weight list, which ``torch.ao.quantization.quantize_dynamic`` cannot see. :func:`inference_module`
copies the trained weights into plain ``nn.Embedding`` / ``nn.LSTM`` / ``nn.Linear`` /
``nn.LayerNorm`` modules that compute, in eval mode, what the trained model computes (every
dropout, DropConnect included, is the identity at evaluation), with one signature for every model::

    forward(tokens: (B, T) int64, state: List[Tensor]) -> (log_probs: (B, T, V), new state)

``state`` is ``[h_0, c_0, h_1, c_1, ...]`` with ``h_l, c_l: (1, B, H_l)`` for an LSTM stack
(reglm's :class:`~reglm.encoders.base.LSTMStackState` layout), and ``[]`` for the stateless
Transformer. The modules are TorchScript-compatible (``torch.jit.script``) and traceable by the
ONNX exporter.

Each component kind has one builder, found by the kind in the model's config (``INPUTS``,
``ENCODERS``, ``OUTPUTS`` below, mirroring the model's registries); a kind without one is a
:class:`~reglm.errors.ReglmError` naming it. What each builder does, and where it is not a
plain copy:

* ``embedding``: ``nn.Embedding`` with the trained matrix;
* ``adaptive`` input: per band an ``nn.Embedding`` and an ``nn.Linear(d_i, d, bias=False)``; every
  token is looked up in every band (ids clamped into it) and the band it belongs to is selected
  with ``where``, which needs no data-dependent shapes (reglm's training layer sorts tokens by band);
* ``char-cnn``: the CNN's output depends on the word only, so its ``(V, dim)`` table is computed once
  and exported as an ``nn.Embedding``;
* ``awd-lstm``, ``vd-lstm``: one ``nn.LSTM(batch_first=True)`` per layer (sizes differ per layer);
* ``transformer``: reglm's own blocks (already plain modules), with the sinusoidal positions
  computed in the graph for any length;
* ``softmax`` (tied: the ``nn.Linear`` shares the embedding's Parameter), ``mos`` / ``doc``,
  ``adaptive`` softmax: their evaluation formulas, as ``nn.Linear`` modules.
"""

# no `from __future__ import annotations` here: TorchScript reads the class-level attribute
# annotations (``extra_layers: list[int]``) as objects, not strings
import copy
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.errors import ReglmError
from reglm.models import LanguageModel

CHAR_TABLE_ROWS = 4096
"""Words per batch when a character CNN's word table is computed."""


def _frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)


def _linear(weight: Tensor | nn.Parameter, bias: Tensor | None = None, shared: bool = False) -> nn.Linear:
    """An ``nn.Linear`` computing ``x weight^T + bias``; ``shared``: ``weight`` is a Parameter of
    the inference module already (tying), used as it is rather than copied."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight = weight if shared else _frozen(weight)
    if bias is not None:
        layer.bias = _frozen(bias)
    return layer


# ---------------------------------------------------------------------------- input layers


class EmbeddingInput(nn.Module):
    """``tokens: (B, T) -> (B, T, E)``: a lookup in ``table.weight: (V, E)``."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.table = nn.Embedding(*weight.shape, device=weight.device, dtype=weight.dtype)
        self.table.weight = _frozen(weight)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table(tokens)


class Band(nn.Module):
    """One band ``[lo, hi)`` of an adaptive input: ``W_i E_i[id - lo]`` (``(..., d)``)."""

    def __init__(self, lo: int, hi: int, weight: Tensor, projection: Tensor) -> None:
        super().__init__()
        self.lo = lo
        self.hi = hi
        self.embedding = nn.Embedding(*weight.shape, device=weight.device, dtype=weight.dtype)
        self.embedding.weight = _frozen(weight)
        self.projection = _linear(projection)

    def forward(self, tokens: Tensor) -> Tensor:
        local = (tokens - self.lo).clamp(0, self.hi - self.lo - 1)
        return self.projection(self.embedding(local))


class AdaptiveInputBands(nn.Module):
    """``tokens: (B, T) -> (B, T, d)``: each token's vector from the band it falls in (the
    head band's, replaced by each tail band's from its first id on)."""

    def __init__(self, bands: list[Band]) -> None:
        super().__init__()
        self.head = bands[0]
        self.tails = nn.ModuleList(bands[1:])

    def forward(self, tokens: Tensor) -> Tensor:
        out = self.head(tokens)
        for band in self.tails:
            out = torch.where((tokens >= band.lo).unsqueeze(-1), band(tokens), out)
        return out


def _embedding(layer: nn.Module) -> nn.Module:
    return EmbeddingInput(layer.weight)


def _adaptive_input(layer: nn.Module) -> nn.Module:
    bounds = layer.bounds
    return AdaptiveInputBands([Band(bounds[i], bounds[i + 1], e, p) for i, (e, p) in enumerate(layer.band_weights())])


@torch.no_grad()
def _char_cnn(layer: nn.Module) -> nn.Module:
    if not layer.spelled:
        raise ReglmError("the char-cnn input layer has no spellings (built without a vocabulary); export a model loaded from its model directory")
    spellings = layer.spellings
    rows = [layer.word_vectors(spellings[i : i + CHAR_TABLE_ROWS]) for i in range(0, spellings.size(0), CHAR_TABLE_ROWS)]
    return EmbeddingInput(torch.cat(rows))


# ---------------------------------------------------------------------------- encoders


class LSTMStack(nn.Module):
    """``x: (B, T, I)`` through one ``nn.LSTM`` per layer; returns the last layer's output, every
    layer's output and the new ``[h_0, c_0, h_1, c_1, ...]``."""

    def __init__(self, layers: list[nn.LSTM]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        outputs: list[Tensor] = []
        new_state: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            x, (h, c) = layer(x, (state[2 * i], state[2 * i + 1]))
            outputs.append(x)
            new_state.append(h)
            new_state.append(c)
        return x, outputs, new_state


class TransformerBody(nn.Module):
    """reglm's Transformer encoder in eval mode (:mod:`reglm.encoders.transformer`): input scale,
    projection, sinusoidal positions ``0 .. T-1`` (computed for the block's length, so any ``T``),
    the blocks, final LayerNorm and output projection. Stateless: ``state`` is passed through."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.input_scale = float(encoder.input_scale)
        self.input_proj = copy.deepcopy(encoder.input_proj)
        self.blocks = copy.deepcopy(encoder.blocks)
        self.final_norm = copy.deepcopy(encoder.final_norm)
        self.output_proj = copy.deepcopy(encoder.output_proj)
        dim = encoder.d_model
        half = dim // 2
        step = math.log(10000.0) / max(half - 1, 1)
        # the frequencies exactly as reglm.encoders.transformer.sinusoidal_positions computes them
        self.register_buffer("freqs", torch.exp(torch.arange(half, dtype=torch.float32) * -step), persistent=False)
        self.odd = dim % 2 == 1

    def forward(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        dtype = x.dtype
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.input_proj is not None:
            x = self.input_proj(x)
        angles = torch.arange(x.size(1), dtype=torch.float32, device=x.device).unsqueeze(1) * self.freqs.unsqueeze(0)
        positions = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        if self.odd:
            positions = torch.cat([positions, torch.zeros_like(positions[:, :1])], dim=1)
        x = x + positions.to(dtype)
        outputs: list[Tensor] = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.output_proj is not None:
            x = self.output_proj(x)
        return x, outputs, state


def _lstm_stack(encoder: nn.Module) -> tuple[nn.Module, list[int]]:
    layers = []
    for layer in encoder.layers:
        ref = layer.weight_hh_l0
        lstm = nn.LSTM(layer.input_size, layer.hidden_size, batch_first=True, device=ref.device, dtype=ref.dtype)
        # the trained layers name their parameters as nn.LSTM's single layer does
        lstm.load_state_dict({name: p.detach() for name, p in layer.named_parameters()})
        layers.append(lstm.requires_grad_(False))
    return LSTMStack(layers), [layer.hidden_size for layer in encoder.layers]


def _transformer(encoder: nn.Module) -> tuple[nn.Module, list[int]]:
    return TransformerBody(encoder).requires_grad_(False), []


# ---------------------------------------------------------------------------- output layers


class SoftmaxHead(nn.Module):
    """``log softmax(h W^T + b)``."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, h: Tensor, layers: list[Tensor]) -> Tensor:
        return F.log_softmax(self.proj(h), dim=-1)


class MixtureHead(nn.Module):
    """The mixture of softmaxes (and DOC) at evaluation: ``log sum_k pi_k softmax(W h_k + b)``
    (:mod:`reglm.outputs.mixture`); ``extra_layers`` are the encoder layers DOC's extra experts read."""

    extra_layers: list[int]

    def __init__(self, prior: nn.Linear, latent: nn.Linear, extra_latents: list[nn.Linear], extra_layers: list[int], decoder: nn.Linear, experts: int, emb_size: int) -> None:
        super().__init__()
        self.prior = prior
        self.latent = latent
        self.extra_latents = nn.ModuleList(extra_latents)
        self.extra_layers = extra_layers
        self.decoder = decoder
        self.experts = experts
        self.emb_size = emb_size

    def forward(self, h: Tensor, layers: list[Tensor]) -> Tensor:
        log_prior = F.log_softmax(self.prior(h), dim=-1)  # (B, T, K)
        latents = [self.latent(h)]
        for i, proj in enumerate(self.extra_latents):
            latents.append(proj(layers[self.extra_layers[i]]))
        latent = torch.tanh(torch.cat(latents, dim=-1)).view(h.size(0), h.size(1), self.experts, self.emb_size)
        expert_log_probs = F.log_softmax(self.decoder(latent), dim=-1)  # (B, T, K, V)
        return torch.logsumexp(expert_log_probs + log_prior.unsqueeze(-1), dim=-2)


class Tail(nn.Module):
    """One tail cluster of an adaptive softmax: ``log softmax(E_i (P_i^T h))`` over its words."""

    def __init__(self, projection: nn.Linear, words: nn.Linear) -> None:
        super().__init__()
        self.projection = projection
        self.words = words

    def forward(self, h: Tensor) -> Tensor:
        return F.log_softmax(self.words(self.projection(h)), dim=-1)


class AdaptiveSoftmaxHead(nn.Module):
    """The adaptive softmax's full log-probabilities (:mod:`reglm.outputs.adaptive_softmax`):
    the head's words, then every tail's words plus its cluster's head log-probability."""

    def __init__(self, head: nn.Linear, head_projection: nn.Linear | None, clusters: nn.Linear, tails: list[Tail]) -> None:
        super().__init__()
        self.head = head
        self.head_projection = head_projection
        self.clusters = clusters
        self.tails = nn.ModuleList(tails)
        self.c1 = head.out_features

    def forward(self, h: Tensor, layers: list[Tensor]) -> Tensor:
        head_in = h
        if self.head_projection is not None:
            head_in = self.head_projection(h)
        head = F.log_softmax(torch.cat([self.head(head_in), self.clusters(h)], dim=-1), dim=-1)
        parts = [head[..., : self.c1]]
        for j, tail in enumerate(self.tails):
            parts.append(tail(h) + head[..., self.c1 + j : self.c1 + j + 1])
        return torch.cat(parts, dim=-1)


def _decoder(layer: nn.Module, model: LanguageModel, inputs: nn.Module) -> nn.Linear:
    """``h W^T + b`` of a softmax or mixture layer; when ``W`` is the trained input layer's matrix
    (weight tying) the inference input layer's copy is shared, not copied again."""
    if layer.weight is getattr(model.embedding, "weight", None):
        return _linear(inputs.table.weight, layer.bias, shared=True)
    return _linear(layer.weight, layer.bias)


def _softmax(layer: nn.Module, model: LanguageModel, inputs: nn.Module) -> nn.Module:
    return SoftmaxHead(_decoder(layer, model, inputs))


def _mixture(layer: nn.Module, model: LanguageModel, inputs: nn.Module) -> nn.Module:
    decoder = _decoder(layer, model, inputs)
    extra = [_linear(proj.weight, proj.bias) for proj in layer.extra_latents]
    prior = _linear(layer.prior.weight)
    latent = _linear(layer.latent.weight, layer.latent.bias)
    return MixtureHead(prior, latent, extra, list(layer.extra_layers), decoder, layer.total_experts, layer.emb_size)


def _adaptive_softmax(layer: nn.Module, model: LanguageModel, inputs: nn.Module) -> nn.Module:
    # P_i: (d, d_i) is applied as h @ P_i, i.e. nn.Linear with weight P_i^T
    head_projection = None if layer.head_projection is None else _linear(layer.head_projection.t())
    tails = [Tail(_linear(layer.tail_projections[j].t()), _linear(layer.band_weight(j + 1))) for j in range(layer.num_bands - 1)]
    return AdaptiveSoftmaxHead(_linear(layer.band_weight(0)), head_projection, _linear(layer.cluster_weight), tails)


# ---------------------------------------------------------------------------- the model


class StateName(NamedTuple):
    """One state tensor ``(1, batch, size)``: its name as an input and as an output."""

    input: str
    output: str
    size: int


def state_names(sizes: list[int]) -> list[StateName]:
    """The state tensors of LSTM layers of ``sizes`` units, in the order of the state list:
    ``h0_0 -> hn_0, c0_0 -> cn_0, h0_1 -> hn_1, ...``."""
    return [StateName(f"{k}0_{l}", f"{k}n_{l}", size) for l, size in enumerate(sizes) for k in ("h", "c")]


class InferenceLM(nn.Module):
    """``forward(tokens: (B, T), state) -> (log_probs: (B, T, V), new state)``; see the module
    docstring. ``state_sizes``: ``H_l`` of every LSTM layer (empty when stateless)."""

    state_sizes: list[int]

    def __init__(self, inputs: nn.Module, body: nn.Module, head: nn.Module, state_sizes: list[int], vocab_size: int) -> None:
        super().__init__()
        self.inputs = inputs
        self.body = body
        self.head = head
        self.state_sizes = state_sizes
        self.vocab_size = vocab_size

    def forward(self, tokens: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        output, layers, new_state = self.body(self.inputs(tokens), state)
        return self.head(output, layers), new_state

    def initial_state(self, batch_size: int) -> list[Tensor]:
        """The zero state of ``batch_size`` streams."""
        return [torch.zeros(1, batch_size, size) for size in self.state_sizes for _ in range(2)]


INPUTS: dict[str, Callable[[nn.Module], nn.Module]] = {"embedding": _embedding, "adaptive": _adaptive_input, "char-cnn": _char_cnn}
ENCODERS: dict[str, Callable[[nn.Module], tuple[nn.Module, list[int]]]] = {"awd-lstm": _lstm_stack, "vd-lstm": _lstm_stack, "transformer": _transformer}
OUTPUTS: dict[str, Callable[[nn.Module, LanguageModel, nn.Module], nn.Module]] = {"softmax": _softmax, "mos": _mixture, "doc": _mixture, "adaptive": _adaptive_softmax}


def _builder(table: dict[str, Any], option: str, kind: str) -> Any:
    if kind not in table:
        raise ReglmError(f"{option}={kind} cannot be exported: reglm has no inference module for it (exportable: {', '.join(sorted(table))}); "
                         "train the model with an exportable component, or use it through reglm.load")
    return table[kind]


@torch.no_grad()
def inference_module(model: LanguageModel) -> InferenceLM:
    """The inference-only copy of ``model`` (on the CPU, in eval mode, without gradients);
    ``model`` itself is left as it was."""
    cfg = model.cfg
    was_training = model.training
    model.eval()
    try:
        inputs = _builder(INPUTS, "model.input.kind", cfg.input.kind)(model.embedding)
        body, sizes = _builder(ENCODERS, "model.encoder.kind", cfg.encoder.kind)(model.encoder)
        head = _builder(OUTPUTS, "model.output.kind", cfg.output.kind)(model.output, model, inputs)
    finally:
        model.train(was_training)
    return InferenceLM(inputs, body, head, sizes, model.vocab_size).cpu().eval().requires_grad_(False)
