"""The language model: input layer -> encoder -> output layer, assembled from registries.

Each stage is a component chosen by its config's ``kind`` in its family's registry
(:func:`~reglm.config.kinds.component_class`): ``INPUTS`` (:mod:`reglm.inputs`), ``ENCODERS``
(:mod:`reglm.encoders`), ``OUTPUTS`` (:mod:`reglm.outputs`). The model knows
nothing of what a component is: the input layer turns ids into vectors (and offers the matrix a
tied output layer shares), the encoder returns an :class:`~reglm.encoders.base.EncoderOutput`
with an opaque state, and the output layer implements :mod:`reglm.outputs.base`. Tying
(``model.output.tie_weights``) registers the input layer's matrix in the output layer as one
Parameter under both names; ``safetensors`` stores it once (:mod:`reglm.modeldir`).

Training-only input noise (Wang et al. 2019, section 5) is passed to :meth:`LanguageModel.forward`
by the trainer per its schedule; the objective terms (AR/TAR, the augmented loss;
:mod:`reglm.objectives`) read the encoder output and, when asked, the output layer's logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from reglm.config import ModelConfig
from reglm.config.kinds import component_class
from reglm.data.vocab import Vocab
from reglm.encoders.base import EncoderOutput, State
from reglm.outputs.base import OutputLayer


class LanguageModel(nn.Module):
    """A word-level language model built from ``(cfg, vocab_size)``: ``embedding`` (the input
    layer), ``encoder`` and ``output`` modules. ``vocab`` gives input layers that read the words
    themselves (a character CNN) their spelling; without it they are built with placeholder
    spellings of the same shapes (enough to count parameters, or to load saved weights)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, vocab: Vocab | None = None) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if vocab is not None and len(vocab) != vocab_size:
            raise ValueError(f"the vocabulary has {len(vocab)} words, not {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embedding = component_class("input", cfg.input, "model.input").from_config(cfg.input, vocab_size, vocab)
        self.encoder = component_class("encoder", cfg.encoder, "model.encoder").from_config(
            cfg.encoder, self.embedding.output_size
        )
        self.output: OutputLayer = component_class("output", cfg.output, "model.output").from_config(
            cfg.output, self.encoder.output_size, vocab_size, self.embedding, self.encoder
        )

    def forward(self, ids: Tensor, state: State | None = None, input_noise: float = 0.0) -> EncoderOutput:
        """``ids: (B, T)``, ``state`` from :meth:`init_state` / a previous call, or None (zeros);
        ``input_noise``: std of the training-only Gaussian noise on the embedded input."""
        return self.encoder(self.embedding(ids, input_noise), state)

    @property
    def skips_parameters(self) -> bool:
        """Whether a training step may leave some parameters without a gradient (declared by the
        components, :class:`~reglm.layers.component.Component`): data-parallel training then
        looks for unused parameters."""
        return any(c.skips_parameters for c in (self.embedding, self.encoder, self.output))

    def gradient_mode(self) -> None:
        """Every component in its gradient mode (dynamic evaluation's working copy, in eval mode)."""
        for component in (self.embedding, self.encoder, self.output):
            component.gradient_mode()

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State | None:
        """The encoder's zero state for ``batch_size`` streams (None for a stateless encoder)."""
        return self.encoder.init_state(batch_size, device)

    def nll(self, ids: Tensor, targets: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """``ids, targets: (B, T)`` -> (per-token NLL ``(B, T)``, new state)."""
        out = self(ids, state)
        return self.output.nll(out, targets), out.state

    def log_probs(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State | None]:
        """``ids: (B, T)`` -> (log-probabilities of the next word ``(B, T, V)``, new state)."""
        out = self(ids, state)
        return self.output.predict(out), out.state

    def num_parameters(self) -> int:
        """Number of parameter scalars; a tied matrix counts once."""
        return sum(p.numel() for p in self.parameters())

    def parameter_split(self) -> dict[str, int]:
        """Parameter scalars of the input layer, the encoder (the body) and the output layer; a
        tensor the output layer shares with the input layer counts once, in the input layer."""
        seen: set[int] = set()
        split = {}
        for name in ("embedding", "encoder", "output"):
            params = [p for p in getattr(self, name).parameters() if id(p) not in seen]
            seen.update(id(p) for p in params)
            split[{"embedding": "input", "encoder": "body", "output": "output"}[name]] = sum(p.numel() for p in params)
        return split


class _ShapesOnly(TorchFunctionMode):
    """Inside :func:`shapes_only`: initializers on meta tensors return the tensor untouched.

    A meta tensor has no values to initialize, but ``torch.nn.init`` on one runs PyTorch's Python
    reference kernels, whose first call imports ``torch._dynamo`` (seconds of every start of
    ``reglm train``; docs/benchmarks.md) to compute nothing."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        first = args[0] if args else (kwargs or {}).get("tensor")  # torch.nn.init passes it by name
        if (
            isinstance(first, Tensor)
            and first.is_meta
            and (
                getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", "") in _IN_PLACE_FILLS
            )
        ):
            return first
        return func(*args, **(kwargs or {}))


_IN_PLACE_FILLS = frozenset({"normal_", "uniform_", "fill_", "zero_", "exponential_", "bernoulli_", "random_", "copy_"})


@contextmanager
def shapes_only() -> Iterator[None]:
    """Build modules on the meta device: every parameter has its shape, none has memory or values."""
    with torch.device("meta"), _ShapesOnly():
        yield


def count_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """The parameter count of ``LanguageModel(cfg, vocab_size)``, built on the meta device
    (:func:`shapes_only`): no memory is allocated, whatever the sizes."""
    with shapes_only():
        return LanguageModel(cfg, vocab_size).num_parameters()
