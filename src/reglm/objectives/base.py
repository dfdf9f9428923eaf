"""Objective terms: what each one reads, and how the trainer hands it over.

A term is a callable ``term(inputs) -> ()`` scalar added to the training loss, with ``reads``
naming what it needs of :class:`TermInputs`: ``"output"`` / ``"raw_output"`` (the encoder output
before / after its output dropout), ``"logits"`` (the clean softmax logits ``(N, V)``; the output
layer computes them once for the NLL and keeps them only when a term reads them), ``"targets"``,
``"input_weight"`` (the input layer's ``(V, E)`` matrix). A term that reads logits needs an output
layer with the ``softmax-logits`` capability (a config check).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from reglm.encoders.base import EncoderOutput


@dataclass
class TermInputs:
    out: EncoderOutput
    targets: Tensor
    """(B, T)"""
    logits: Tensor | None
    """(N, V) clean softmax logits, when a term reads them"""
    model: nn.Module


class Term(Protocol):
    reads: frozenset[str]

    def __call__(self, inputs: TermInputs) -> Tensor: ...
