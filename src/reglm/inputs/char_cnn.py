"""A character-CNN input layer (Baevski & Auli 2019, section 4.4, after Kim et al. 2016).

``ids: (B, T) -> (B, T, dim)``: every word id is looked up in a spelling table, its characters
are embedded, convolved by several filters, max-pooled over time, passed through highway layers
and projected:

1. **spelling**: the UTF-8 bytes of the word, truncated to ``max_chars`` and padded, as ids
   ``1 + byte`` (``0`` is padding): a fixed alphabet of 256 bytes plus padding, so the parameter
   count does not depend on the vocabulary. No begin/end-of-word markers (section 4.4: "they did
   not improve validation accuracy"). Special tokens are spelled as their own characters
   (``<unk>`` is the five bytes ``<``, ``u``, ``n``, ``k``, ``>``): the paper trains "on the same
   pre-processed data as the other models, with unknown tokens in both the inputs and outputs".
   (fairseq's ``CharacterTokenEmbedder`` instead gives ``<eos>``/``<unk>`` learned vectors of
   their own; we follow the brief of one spelling for every word.)
2. **character embeddings** ``(257, char_emb_size)`` (section 4.4: size 128); the padding row is
   zero and receives no gradient (``padding_idx=0``), as in Kim et al.'s and fairseq's code;
3. **convolutions**: for every ``width:features`` of ``filters`` (section 4.4: ``1x128, 2x256,
   3x384, 4x512, 5x512, 6x512, 7x512``) a ``Conv1d(char_emb_size, features, width)`` with bias
   over the whole padded spelling (``max_chars`` positions, no padding of the sequence: every
   word's window covers padding too, as in Kim et al. and fairseq), then **max over time** and a
   ReLU, ``y_k = ReLU(max_t conv_k(c)_t)`` -- fairseq's order and nonlinearity (Kim et al. use
   ``max_t tanh(conv_k(c)_t)``); the pooled features are concatenated, ``F = sum features``;
4. **highway layers** (``highway``; section 4.4: one for wikitext-103, two for billion word),
   each one ``Linear(F, 2F)`` giving a transform ``t`` and a gate ``g``:
   ``y = sigmoid(g) * ReLU(t) + (1 - sigmoid(g)) * x`` -- Kim et al.'s eq. (8)-(9) with their
   nonlinearity ``ReLU``;
5. a **projection** ``Linear(F, dim)`` with bias (the encoder adds its own bias-free projection
   when ``dim`` differs from its width).

Initialization (fairseq's ``CharacterTokenEmbedder`` and ``Highway``): character embeddings
Xavier-normal with a zero padding row; convolutions PyTorch's default; highway matrices
Xavier-normal, transform bias 0 and gate bias ``-1`` (fairseq's carry-gate bias ``+1`` in our
sign convention, which biases the layer to carry its input; Kim et al. use ``-2``); projection
Xavier-uniform with a zero bias. In training, Gaussian noise of ``noise_std`` is added to the
output, as the word embedding does.

The spelling table ``spellings: (V, max_chars)`` (int16) is a *persistent* buffer: it is built
from the vocabulary passed to :meth:`CharCNN.from_config` and saved with the weights, so a saved
model reloads with the very spellings it was trained with. Built without a vocabulary the table is
a placeholder of padding (the model can be built, counted and loaded into); running it before
real spellings were loaded is an error rather than every word getting the same vector.

Cost: the convolutions see every token's ``max_chars`` positions (``sum_k (max_chars - w_k + 1) *
w_k * char_emb_size * c_k`` multiply-adds per token, about 76M at the paper's filters and 50
characters, and activations of ``(max_chars - w_k + 1) * c_k`` per filter), so a smaller
``max_chars`` is the knob when the longest words are shorter. The spelling table is a buffer:
under DDP it is constant, so ``broadcast_buffers=False`` avoids re-sending it every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reglm.config.fields import ComponentConfig, check, kind_field, option
from reglm.errors import ReglmError
from reglm.inputs.base import InputLayer
from reglm.layers.inference import EmbeddingLookup, Frozen

ALPHABET = 257
"""Character ids: 0 is padding, ``1 + b`` is the byte ``b``."""

PAD = 0

HIGHWAY_GATE_BIAS = -1.0
"""Initial bias of the highway gate ``g`` (fairseq's carry bias +1 in our sign convention)."""
EXPORT_ROWS = 4096
"""Words per batch when the export computes the word table."""


def parse_filters(spec: str, option_name: str = "model.input.filters") -> tuple[tuple[int, int], ...]:
    """``"1:128,2:256"`` -> ``((1, 128), (2, 256))``: (width, features) of every filter, each >= 1."""
    filters = []
    for item in str(spec).split(","):
        parts = item.strip().split(":")
        ok = len(parts) == 2 and all(p.strip().isdigit() and int(p) >= 1 for p in parts)
        check(
            ok, option_name, f"{spec!r} must be comma-separated width:features pairs of integers >= 1, e.g. 1:128,2:256"
        )
        filters.append((int(parts[0]), int(parts[1])))
    return tuple(filters)


def spell(words: list[str], max_chars: int) -> Tensor:
    """The ``(len(words), max_chars)`` int16 spelling table: the UTF-8 bytes of each word as ids
    ``1 + byte``, truncated to ``max_chars``, padded with ``0``."""
    encoded = [w.encode("utf-8")[:max_chars] for w in words]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    table = np.zeros((len(encoded), max_chars), dtype=np.int16)
    if lengths.sum():
        flat = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int16) + 1
        rows = np.repeat(np.arange(len(encoded)), lengths)
        starts = np.cumsum(lengths) - lengths
        cols = np.arange(flat.size) - np.repeat(starts, lengths)
        table[rows, cols] = flat
    return torch.from_numpy(table)


@dataclass(frozen=True)
class CharCNNConfig(ComponentConfig):
    """Words read through a convolution over their characters (Kim et al. 2016; Baevski & Auli 4.4)."""

    kind: str = kind_field(
        "char-cnn",
        "a CNN over the word's UTF-8 bytes",
    )
    char_emb_size: int = option(128, "size of the character (byte) embeddings (the paper: 128)", arch=True)
    filters: str = option(
        "1:128,2:256,3:384,4:512,5:512,6:512,7:512",
        "convolution filters, width:features, comma-separated (the paper's seven)",
        arch=True,
    )
    highway: int = option(
        1, "highway layers after the max-pooling (the paper: 1 for wikitext-103, 2 for billion word)", arch=True
    )
    dim: int = option(512, "output size: the projection after the highway layers", arch=True)
    max_chars: int = option(
        50, "bytes of a word that are read; longer words are truncated (>= the widest filter)", arch=True
    )

    def __post_init__(self) -> None:
        for name in ("char_emb_size", "dim", "max_chars"):
            check(getattr(self, name) >= 1, f"model.input.{name}", f"{getattr(self, name)} must be >= 1")
        check(self.highway >= 0, "model.input.highway", f"{self.highway} must be >= 0")
        widest = max(width for width, _ in self.filter_list)
        check(
            self.max_chars >= widest,
            "model.input.max_chars",
            f"{self.max_chars} must be >= the widest filter ({widest}) in model.input.filters",
        )

    @property
    def filter_list(self) -> tuple[tuple[int, int], ...]:
        """``filters`` parsed: ``(width, features)`` of every filter."""
        return parse_filters(self.filters)

    @property
    def features(self) -> int:
        """``F``: the pooled features of all filters (2816 at the paper's filters)."""
        return sum(features for _, features in self.filter_list)

    @property
    def output_size(self) -> int:
        return self.dim


class Highway(nn.Module):
    """``y = sigmoid(g) * ReLU(t) + (1 - sigmoid(g)) * x`` with ``[t, g] = x W^T + b``,
    ``W: (2F, F)`` (Kim et al. 2016, eqs. 8-9)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.linear = nn.Linear(features, 2 * features)
        nn.init.xavier_normal_(self.linear.weight)
        with torch.no_grad():
            self.linear.bias[:features].zero_()
            self.linear.bias[features:].fill_(HIGHWAY_GATE_BIAS)

    def forward(self, x: Tensor) -> Tensor:
        """``x: (..., F) -> (..., F)``."""
        t, g = self.linear(x).chunk(2, dim=-1)
        g = torch.sigmoid(g)
        return g * F.relu(t) + (1 - g) * x


class CharCNN(InputLayer):
    """The character-CNN input layer; see the module docstring.

    Parameters: ``chars.weight: (257, char_emb_size)``, ``convs.k.{weight: (c_k, char_emb_size, w_k),
    bias: (c_k,)}``, ``highways.l.linear.{weight: (2F, F), bias: (2F,)}``, ``proj.{weight: (dim, F),
    bias: (dim,)}``; buffer ``spellings: (V, max_chars)``.
    """

    Config = CharCNNConfig

    def __init__(self, cfg: CharCNNConfig, vocab_size: int, words: list[str] | None = None) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if words is not None and len(words) != vocab_size:
            raise ValueError(f"{len(words)} words for a vocabulary of {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.output_size = cfg.dim
        self.chars = nn.Embedding(ALPHABET, cfg.char_emb_size, padding_idx=PAD)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.char_emb_size, features, width) for width, features in cfg.filter_list)
        self.highways = nn.ModuleList(Highway(cfg.features) for _ in range(cfg.highway))
        self.proj = nn.Linear(cfg.features, cfg.dim)
        nn.init.xavier_normal_(self.chars.weight)
        with torch.no_grad():
            self.chars.weight[PAD].zero_()
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        device = torch.empty(0).device  # honours a torch.device(...) context (meta for counting)
        if words is None:
            table = torch.full((vocab_size, cfg.max_chars), PAD, dtype=torch.int16, device=device)
        else:
            table = spell(words, cfg.max_chars).to(device)
        self.register_buffer("spellings", table, persistent=True)
        self.spelled = words is not None

    @classmethod
    def from_config(cls, cfg: CharCNNConfig, vocab_size: int, vocab: Any = None) -> CharCNN:
        """``vocab``: a :class:`~reglm.data.vocab.Vocab` (its ``itos`` give the spellings) or None
        (placeholder spellings, to be loaded with the weights)."""
        return cls(cfg, vocab_size, None if vocab is None else list(vocab.itos))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # loaded spellings are real spellings (unless they are a saved placeholder)
        table = state_dict.get(prefix + "spellings")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if isinstance(table, Tensor) and table.device.type != "meta":
            self.spelled = bool(table.any())

    def word_vectors(self, spellings: Tensor) -> Tensor:
        """``spellings: (N, max_chars)`` character ids -> ``(N, dim)``."""
        c = self.chars(spellings.long()).transpose(1, 2)  # (N, char_emb_size, max_chars)
        pooled = torch.cat([conv(c).amax(dim=-1) for conv in self.convs], dim=-1)  # (N, F)
        y = F.relu(pooled)
        for highway in self.highways:
            y = highway(y)
        return self.proj(y)

    def forward(self, ids: Tensor, noise_std: float = 0.0) -> Tensor:
        """``ids: (B, T) -> (B, T, dim)``; ``noise_std``: the training-only Gaussian input noise."""
        if not self.spelled:
            raise ReglmError(
                "the char-cnn input layer was built without a vocabulary, so it has no spellings; "
                "build the model with its vocabulary (LanguageModel(cfg, V, vocab)) or load saved weights into it"
            )
        x = self.word_vectors(self.spellings[ids.reshape(-1)]).view(*ids.shape, self.output_size)
        if self.training and noise_std > 0:
            x = x + noise_std * torch.randn_like(x)
        return x

    @torch.no_grad()
    def export_module(self, frozen: Frozen) -> nn.Module:
        """The CNN's output depends on the word only: its ``(V, dim)`` table, computed once
        (:data:`EXPORT_ROWS` words at a time), as a lookup."""
        if not self.spelled:
            raise ReglmError(
                "the char-cnn input layer has no spellings (built without a vocabulary); "
                "export a model loaded from its model directory"
            )
        starts = range(0, self.spellings.size(0), EXPORT_ROWS)
        rows = [self.word_vectors(self.spellings[i : i + EXPORT_ROWS]) for i in starts]
        return EmbeddingLookup(frozen.embedding(torch.cat(rows)))

    def extra_repr(self) -> str:
        return (
            f"vocab_size={self.vocab_size}, filters={self.cfg.filters!r}, highway={self.cfg.highway}, "
            f"dim={self.cfg.dim}, max_chars={self.cfg.max_chars}"
        )
