"""A decoder-only Transformer encoder (Baevski & Auli, 2019, section 4.1; Vaswani et al., 2017).

Layout is batch-first throughout: embedded tokens ``x: (B, T, I)`` in, ``(B, T, D_out)`` out, with
``e = d_model`` the width of the residual stream. The encoder is stateless: every window is
encoded from scratch (``state`` is always ``None``); context beyond a window is not carried.

The computation, in order (``e``, ``N``, ``H``, ``e_ff`` are the paper's symbols):

1. ``x * sqrt(e)`` when ``scale_input`` (the authors' fairseq code scales the input embedding by
   ``sqrt(decoder_embed_dim)``; the paper does not mention it);
2. a linear projection without bias ``I -> e`` when the input size ``I`` differs from ``e``
   (section 4.1: "when the dimensionality of the input or output layer differs from e, then we
   add a simple linear projection with no bias"); applied after the scaling, as fairseq does;
3. plus sinusoidal position embeddings (section 4.1; no parameters), :func:`sinusoidal_positions`;
4. dropout ``dropout``;
5. ``N`` pre-LayerNorm blocks (:class:`TransformerBlock`; section 4.1: "we apply layer
   normalization before the self-attention and FFN blocks instead of after"), each
   ``x = x + drop(attn(LN(x)))``, then ``x = x + drop(FFN(LN(x)))``;
6. a final LayerNorm when ``final_norm`` (fairseq's default for pre-norm decoders; note that the
   authors' recipes, ``transformer_lm_wiki103`` and ``transformer_lm_gbw`` alike, set
   ``no_decoder_final_norm`` and so disable it);
7. a linear projection without bias ``e -> output_dim`` when ``output_dim`` is set and differs
   from ``e`` (section 4.1 again).

Choices where the paper is silent, all taken from the authors' fairseq ``transformer_lm``:

* **Positions** are the fairseq sinusoids (first half ``sin``, second half ``cos``, frequencies
  ``exp(-log(10000) * i / (half - 1))``), but **0-based**: the first token of a window is
  position 0 (fairseq starts at ``padding_idx + 1 = 2`` because of its padding scheme; only an
  offset, which a model trained here does not care about).
* **Attention**: ``H`` heads of size ``e / H``, queries scaled by ``1 / sqrt(e / H)``, a causal mask,
  dropout ``attention_dropout`` on the attention probabilities; q/k/v and output projections
  with biases (fairseq's ``MultiheadAttention``), here one fused ``(3e, e)`` q/k/v matrix. The
  kernel is ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` (flash or
  memory-efficient attention on CUDA).
* **FFN**: ``ReLU(x W1 + b1) W2 + b2`` (section 4.1) with dropout ``relu_dropout`` after the ReLU
  (fairseq's ``activation_dropout``), ``dropout`` on each sub-block's output before the residual
  add (fairseq's ``dropout``).
* **Initialization** (fairseq): every projection matrix Xavier-uniform -- the fused ``(3e, e)``
  q/k/v matrix as one matrix, which is the same distribution as fairseq's per-matrix Xavier with
  gain ``1/sqrt(2)`` --, every bias zero, LayerNorm weight 1 and bias 0.

Paper settings (section 4.1): ``N = 16``, ``H = 16``, ``e = 1024``, ``e_ff = 4096``; wikitext-103:
dropout 0.3, attention dropout 0.1, ReLU dropout 0.1; billion word: dropout 0.1, attention dropout
0.1. The defaults here are fairseq's ``base_lm_architecture`` (a small model): 512 / 6 layers /
8 heads / 2048, dropout 0.1.

Mixed precision: nothing is cast by hand. Under CUDA bf16 autocast, the linear layers and the
attention run in bf16 while torch's autocast keeps LayerNorm (and the softmax inside the math
attention kernel) in fp32; the residual stream stays in the dtype of the encoder's input (the
positions are added in that dtype, so a bf16 output of the input projection is promoted back, and
every sub-block's bf16 output is added to it). The forward pass has no host synchronization.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, check_prob, kind_field, option
from reglm.encoders.base import Encoder, EncoderOutput, StateTensor
from reglm.layers.inference import Frozen


def sinusoidal_positions(
    length: int, dim: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The ``(length, dim)`` sinusoidal position embeddings of positions ``0 .. length - 1``.

    With ``half = dim // 2`` and ``f_i = exp(-log(10000) * i / (half - 1))`` for ``i < half``
    (fairseq's ``SinusoidalPositionalEmbedding.get_embedding``): column ``i`` is ``sin(p f_i)``,
    column ``half + i`` is ``cos(p f_i)``; an odd ``dim`` gets a last column of zeros. With
    ``half == 1`` the one frequency is 1. Computed in fp32, returned as ``dtype``.
    """
    if length < 0 or dim < 1:
        raise ValueError(f"need length >= 0 and dim >= 1, got {length}, {dim}")
    steps = torch.arange(length, device=device, dtype=torch.float32)
    return sinusoids(steps, position_frequencies(dim, device), dim % 2 == 1).to(dtype)


def position_frequencies(dim: int, device: torch.device | str | None = None) -> Tensor:
    """``f_i`` for ``i < dim // 2`` (:func:`sinusoidal_positions`), float32."""
    half = dim // 2
    step = math.log(10000.0) / max(half - 1, 1)
    return torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -step)


def sinusoids(steps: Tensor, freqs: Tensor, odd: bool) -> Tensor:
    """``steps: (T,)`` float32 positions, ``freqs: (half,)`` -> ``(T, 2 half + odd)``
    (:func:`sinusoidal_positions`); TorchScript-compatible, for the export module."""
    angles = steps.unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if odd:
        table = torch.cat([table, torch.zeros_like(table[:, :1])], dim=1)
    return table


@dataclass(frozen=True)
class TransformerConfig(ComponentConfig):
    """A decoder-only pre-LayerNorm Transformer (Baevski & Auli 2019, section 4.1)."""

    kind: str = kind_field(
        "transformer",
        "decoder-only, pre-LayerNorm; Baevski & Auli 2019",
    )
    d_model: int = option(512, "e: width of the residual stream, attention and block outputs", arch=True)
    layers: int = option(6, "N: number of blocks (the paper: 16)", arch=True)
    heads: int = option(8, "H: attention heads; must divide d_model (the paper: 16)", arch=True)
    ffn_dim: int = option(2048, "e_ff: inner size of the feed-forward sub-block (the paper: 4096)", arch=True)
    dropout: float = option(
        0.1,
        "dropout on the embedded input (after positions) and on each sub-block's output before its residual add "
        "(paper: 0.3 wt103, 0.1 gbw)",
    )
    attention_dropout: float = option(0.0, "dropout on the attention probabilities (paper: 0.1)")
    relu_dropout: float = option(0.0, "dropout after the FFN's ReLU (fairseq's activation_dropout; paper: 0.1 wt103)")
    scale_input: bool = option(
        True, "multiply the input by sqrt(d_model) before the positions are added (the authors' fairseq code)"
    )
    final_norm: bool = option(
        True,
        "a LayerNorm after the last block (fairseq's default; the authors' wiki103 and gbw recipes drop it)",
        arch=True,
    )
    output_dim: int | None = option(
        None, "size of the output (none: d_model; otherwise a linear projection without bias from d_model)", arch=True
    )

    def __post_init__(self) -> None:
        for name in ("d_model", "layers", "heads", "ffn_dim"):
            value = getattr(self, name)
            check(value >= 1, f"model.encoder.{name}", f"{value} must be >= 1")
        check(
            self.d_model % self.heads == 0,
            "model.encoder.heads",
            f"{self.heads} heads must divide model.encoder.d_model ({self.d_model})",
        )
        check(
            self.output_dim is None or self.output_dim >= 1,
            "model.encoder.output_dim",
            f"{self.output_dim} must be >= 1 or none",
        )
        for name in ("dropout", "attention_dropout", "relu_dropout"):
            check_prob(getattr(self, name), f"model.encoder.{name}")

    def output_size(self, input_size: int) -> int:
        """``output_dim`` when set, else ``d_model`` (whatever the input size)."""
        return self.d_model if self.output_dim is None else self.output_dim

    def layer_sizes(self, input_size: int) -> list[int]:
        """``[d_model] * layers``: the width of every block's output."""
        return [self.d_model] * self.layers


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``x: (B, T, e)``.

    ``qkv: Linear(e, 3e)`` (rows ``[W_q; W_k; W_v]``, with bias) and ``out: Linear(e, e)`` (with
    bias); ``H`` heads of size ``e / H``; dropout ``attention_dropout`` on the attention
    probabilities in training mode only.
    """

    def __init__(self, d_model: int, heads: int, attention_dropout: float) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"{heads} heads do not divide d_model={d_model}")
        self.d_model = d_model
        self.heads = heads
        self.attention_dropout = float(attention_dropout)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, T, e) -> (B, T, e)``; position ``t`` reads positions ``0 .. t`` only."""
        batch, length, _ = x.shape
        q, k, v = (
            self.qkv(x).view(batch, length, 3, self.heads, self.d_model // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        )
        # q, k, v: (B, H, T, e / H)
        p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, self.d_model))


class TransformerBlock(nn.Module):
    """One pre-LayerNorm block: ``x + drop(attn(LN1(x)))``, then ``x + drop(FFN(LN2(x)))`` with
    ``FFN(h) = W2 drop_relu(ReLU(W1 h + b1)) + b2``.

    Parameters: ``4(e^2 + e)`` attention, ``2 e e_ff + e_ff + e`` FFN, ``4e`` in the two LayerNorms.
    """

    def __init__(
        self, d_model: int, heads: int, ffn_dim: int, dropout: float, attention_dropout: float, relu_dropout: float
    ) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, attention_dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = float(dropout)
        self.relu_dropout = float(relu_dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (B, T, e) -> (B, T, e)``."""
        x = x + F.dropout(self.attn(self.attn_norm(x)), self.dropout, self.training)
        h = F.dropout(F.relu(self.fc1(self.ffn_norm(x))), self.relu_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.dropout, self.training)


class TransformerLayers(nn.Module):
    """What the encoder and its export module share: steps 1, 2 and 4 to 7 of the module
    docstring around the given positions (step 3), TorchScript-compatible."""

    def body(self, x: Tensor, positions: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``x: (B, T, I)``, ``positions: (T, e)`` in ``x``'s dtype -> the output and every
        block's output."""
        if self.input_scale != 1.0:
            x = x * self.input_scale
        if self.input_proj is not None:
            x = self.input_proj(x)
        x = x + positions
        x = F.dropout(x, self.dropout, self.training)
        layer_outputs: list[Tensor] = []
        for block in self.blocks:
            x = block(x)
            layer_outputs.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.output_proj is not None:
            x = self.output_proj(x)
        return x, layer_outputs


class TransformerEncoder(Encoder, TransformerLayers):
    """The decoder-only Transformer of Baevski & Auli (2019), section 4.1; see the module docstring.

    Submodules: ``input_proj`` (``Linear(I, e, bias=False)``, or None when ``I == e``), ``blocks``
    (``N`` :class:`TransformerBlock`), ``final_norm`` (``LayerNorm(e)`` or None), ``output_proj``
    (``Linear(e, output_dim, bias=False)``, or None when ``output_dim`` is unset or ``== e``).
    """

    Config = TransformerConfig

    def __init__(self, cfg: TransformerConfig, input_size: int) -> None:
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        e = cfg.d_model
        self.cfg = cfg
        self.input_size = input_size
        self.d_model = e
        self.input_scale = math.sqrt(e) if cfg.scale_input else 1.0
        self.input_proj = nn.Linear(input_size, e, bias=False) if input_size != e else None
        self.blocks = nn.ModuleList(
            TransformerBlock(e, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout, cfg.relu_dropout)
            for _ in range(cfg.layers)
        )
        self.final_norm = nn.LayerNorm(e) if cfg.final_norm else None
        out = cfg.output_size(input_size)
        self.output_proj = nn.Linear(e, out, bias=False) if out != e else None
        self.dropout = float(cfg.dropout)
        self.output_size = out
        self.layer_sizes = cfg.layer_sizes(input_size)
        self._positions: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fairseq's initialization: Xavier-uniform matrices, zero biases, LayerNorm (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, cfg: TransformerConfig, input_size: int) -> TransformerEncoder:
        return cls(cfg, input_size)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Stateless: always None."""

    def load_state(self, raw: Any) -> None:
        """Stateless: the only saved state is None; anything else is a ``ValueError``."""
        if raw is not None:
            raise ValueError("the transformer encoder is stateless; its saved state must be None")

    def positions(self, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(length, e)`` sinusoidal embeddings of positions ``0 .. length - 1``, from a table
        kept per device and dtype and regrown (doubling) when a longer window comes."""
        key = (torch.device(device), dtype)
        table = self._positions.get(key)
        if table is None or table.size(0) < length:
            size = max(length, 2 * table.size(0) if table is not None else 64)
            table = self._positions[key] = sinusoidal_positions(size, self.d_model, device, dtype)
        return table[:length]

    def forward(self, x: Tensor, state: None = None) -> EncoderOutput:
        """``x: (B, T, I)`` (the input layer's output); ``state`` must be None. Returns
        :class:`EncoderOutput` with ``output = raw_output: (B, T, output_size)``,
        ``layer_outputs``: every block's output ``(B, T, e)``, and ``state = None``."""
        if state is not None:
            raise ValueError("the transformer encoder is stateless; pass state=None")
        if x.dim() != 3 or x.size(-1) != self.input_size:
            raise ValueError(f"expected input (B, T, {self.input_size}), got {tuple(x.shape)}")
        # the residual stream's dtype: under autocast the projection's bf16 output is promoted back
        x, layer_outputs = self.body(x, self.positions(x.size(1), x.device, x.dtype))
        return EncoderOutput(output=x, raw_output=x, layer_outputs=layer_outputs, state=None)

    def export_module(self, frozen: Frozen) -> tuple[nn.Module, list[StateTensor]]:
        """A copy of the layers, with the positions computed in the graph for any length; no state."""
        return TransformerExport(self), []

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"input_size={self.input_size}, d_model={c.d_model}, heads={c.heads}, ffn_dim={c.ffn_dim}, "
            f"output_size={self.output_size}"
        )


class TransformerExport(TransformerLayers):
    """The encoder's export module: copies of its layers, positions ``0 .. T-1`` computed in the
    graph (so any ``T``); ``forward(x, state) -> (output, block outputs, state)``, stateless."""

    def __init__(self, encoder: TransformerEncoder) -> None:
        super().__init__()
        self.input_scale = float(encoder.input_scale)
        self.input_proj = copy.deepcopy(encoder.input_proj)
        self.blocks = copy.deepcopy(encoder.blocks)
        self.final_norm = copy.deepcopy(encoder.final_norm)
        self.output_proj = copy.deepcopy(encoder.output_proj)
        self.dropout = encoder.dropout
        self.register_buffer("freqs", position_frequencies(encoder.d_model), persistent=False)
        self.odd = encoder.d_model % 2 == 1
        self.requires_grad_(False)

    def forward(self, x: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        steps = torch.arange(x.size(1), dtype=torch.float32, device=x.device)
        x, layer_outputs = self.body(x, sinusoids(steps, self.freqs, self.odd).to(x.dtype))
        return x, layer_outputs, state
