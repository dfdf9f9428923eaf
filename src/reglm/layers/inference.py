"""What the components share to build their export-ready modules.

Every registered component owns its inference path: an input layer, an encoder and an output
layer each have ``export_module(frozen)``, which returns a plain module computing, in eval mode,
what the component computes (every dropout, DropConnect included, is the identity there), made
of ``nn.Embedding`` / ``nn.LSTM`` / ``nn.Linear`` / ``nn.LayerNorm`` layers that TorchScript
scripts, the ONNX exporter traces and ``torch.ao.quantization.quantize_dynamic`` sees. A
component that has no such module raises :class:`NotExportable` from it, and the exporter
(:mod:`reglm.export.modules`) turns that into an error naming the component's option.

The signatures of the three kinds of export modules:

* input layer: ``forward(tokens: (B, T) int64) -> (B, T, E)``;
* encoder: ``forward(x: (B, T, E), state: List[Tensor]) -> (output, layer outputs, new state)``;
  ``export_module`` returns it with the list of its state tensors
  (:class:`~reglm.encoders.base.StateTensor`, empty when stateless);
* output layer: ``forward(h: (B, T, H), layers: List[Tensor]) -> log_probs: (B, T, V)``.

Methods and attributes of these modules avoid class-level annotations: TorchScript cannot read
them as strings (``from __future__ import annotations``), so list attributes are never empty.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class NotExportable(Exception):
    """Raised by a component's ``export_module`` when it has no inference module; the message
    says why."""


class Frozen:
    """Copies of trained tensors as frozen Parameters of export modules.

    :meth:`share` returns one Parameter per trained tensor, so a weight that two components tie
    (the input embedding read by a tied softmax) is one tensor of the export too; :meth:`copy`
    always makes a new one."""

    def __init__(self) -> None:
        self._shared: dict[int, tuple[Tensor, nn.Parameter]] = {}

    def copy(self, tensor: Tensor) -> nn.Parameter:
        return nn.Parameter(tensor.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)

    def share(self, tensor: Tensor) -> nn.Parameter:
        if id(tensor) not in self._shared:
            self._shared[id(tensor)] = (tensor, self.copy(tensor))
        return self._shared[id(tensor)][1]

    def linear(self, weight: Tensor, bias: Tensor | None = None, share: bool = False) -> nn.Linear:
        """An ``nn.Linear`` computing ``x weight^T + bias``."""
        out_features, in_features = weight.shape
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        layer.weight = self.share(weight) if share else self.copy(weight)
        if bias is not None:
            layer.bias = self.copy(bias)
        return layer

    def embedding(self, weight: Tensor, share: bool = False) -> nn.Embedding:
        table = nn.Embedding(*weight.shape, device=weight.device, dtype=weight.dtype)
        table.weight = self.share(weight) if share else self.copy(weight)
        return table


class EmbeddingLookup(nn.Module):
    """``tokens: (B, T) -> (B, T, E)``: a lookup in ``table.weight: (V, E)``."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table(tokens)
