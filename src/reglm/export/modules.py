"""The inference-only module of a trained :class:`~reglm.models.LanguageModel`, assembled from its
components' own export modules.

The exporters and the int8 quantizer do not read reglm's training modules: those carry dropout,
DropConnect and AdvSoft switches, and their LSTM layers call ``torch.lstm`` with an explicit
weight list, which ``torch.ao.quantization.quantize_dynamic`` cannot see. Each component provides
its own export-ready module next to its training code (``export_module``, described in
:mod:`reglm.layers.inference`), and :func:`inference_module` joins the three into one module with
one signature for every model::

    forward(tokens: (B, T) int64, state: List[Tensor]) -> (log_probs: (B, T, V), new state)

``state`` is the encoder's state tensors in the order of :attr:`InferenceLM.state`
(:class:`~reglm.encoders.base.StateTensor`): ``[h0_0, c0_0, h0_1, c0_1, ...]``, each ``(1, B, H_l)``,
for an LSTM stack; ``[c0_0, x0_0, c0_1, ...]``, ``(B, H_l)`` and ``(B, I_l)``, for a QRNN (the
first layer's last input ``x`` when its window is 2); ``[]`` for the stateless Transformer. The
module is TorchScript-compatible (``torch.jit.script``) and traceable by the ONNX exporter. A
component without an inference module is refused with a :class:`~reglm.errors.ReglmError`
naming its option.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reglm.encoders.base import StateTensor
from reglm.errors import ReglmError
from reglm.layers.inference import Frozen, NotExportable
from reglm.models import LanguageModel


class InferenceLM(nn.Module):
    """``forward(tokens: (B, T), state) -> (log_probs: (B, T, V), new state)``; see the module
    docstring. ``state``: the encoder's state tensors (empty when stateless)."""

    __jit_ignored_attributes__ = ["state"]

    def __init__(
        self, inputs: nn.Module, body: nn.Module, head: nn.Module, state: list[StateTensor], vocab_size: int
    ) -> None:
        super().__init__()
        self.inputs = inputs
        self.body = body
        self.head = head
        self.state = state
        self.vocab_size = vocab_size

    def forward(self, tokens: Tensor, state: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        output, layers, new_state = self.body(self.inputs(tokens), state)
        return self.head(output, layers), new_state

    def initial_state(self, batch_size: int) -> list[Tensor]:
        """The zero state of ``batch_size`` streams."""
        return [torch.zeros([batch_size if d == "batch" else d for d in t.shape]) for t in self.state]


def _refused(option: str, kind: str, reason: NotExportable) -> ReglmError:
    return ReglmError(
        f"{option}={kind} cannot be exported: {reason}; "
        "train the model with an exportable component, or use it through reglm.load"
    )


@torch.no_grad()
def inference_module(model: LanguageModel) -> InferenceLM:
    """The inference-only copy of ``model`` (on the CPU, in eval mode, without gradients);
    ``model`` itself is left as it was."""
    cfg = model.cfg
    was_training = model.training
    model.eval()
    frozen = Frozen()
    parts = []
    try:
        for option, kind, component in (
            ("model.input.kind", cfg.input.kind, model.embedding),
            ("model.encoder.kind", cfg.encoder.kind, model.encoder),
            ("model.output.kind", cfg.output.kind, model.output),
        ):
            try:
                parts.append(component.export_module(frozen))
            except NotExportable as exc:
                raise _refused(option, kind, exc) from None
    finally:
        model.train(was_training)
    inputs, (body, state), head = parts
    return InferenceLM(inputs, body, head, state, model.vocab_size).cpu().eval().requires_grad_(False)
