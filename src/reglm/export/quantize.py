"""int8 dynamic quantization of an inference module, and the perplexity that measures its cost.

reglm's LSTM layers run ``torch.lstm`` with an explicit weight list (DropConnect,
:mod:`reglm.encoders.awd_lstm`), so ``torch.ao.quantization.quantize_dynamic`` finds no
``nn.LSTM`` in a trained model and changes nothing. The inference module
(:func:`reglm.export.modules.inference_module`) is made of plain ``nn.LSTM`` and ``nn.Linear``
layers holding the trained weights, so the quantizer applies: LSTM and linear weights are stored
as int8 (one scale per tensor) with the activations quantized on the fly at every call, and
embedding tables as 8-bit rows. (ONNX Runtime's quantizer, :func:`reglm.export.onnx.quantize`,
does the same to the exported graph.)
``torch.ao.quantization`` is deprecated in torch 2.10+ (in favour of ``torchao``, whose int8
dynamic quantization does not cover LSTM layers) but works in 2.13; its deprecation warnings are
silenced here.

:func:`stream_perplexity` reads a token stream through any runner, as one stream in chunks
of :data:`CHUNK` tokens with the state carried (a Transformer reads each chunk as a block of
its own, without the previous one as context), so the float32 and the int8 export are scored
by the same procedure and their ratio is the cost of quantization.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from reglm.evaluate.perplexity import perplexity_of
from reglm.export.modules import InferenceLM

CHUNK = 64
"""Tokens per call when a stream is scored."""

Step = Callable[[Tensor, list[Tensor]], tuple[Tensor, list[Tensor]]]


def quantize_module(module: InferenceLM) -> nn.Module:
    """A copy of ``module`` with every ``nn.LSTM`` and ``nn.Linear`` dynamically quantized (qint8
    weights, one scale per tensor) and every ``nn.Embedding`` stored as 8-bit rows (quint8, a
    scale and offset per row)."""
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig

    spec = {
        nn.LSTM: default_dynamic_qconfig,
        nn.Linear: default_dynamic_qconfig,
        nn.Embedding: float_qparams_weight_only_qconfig,
    }
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*torch.ao.quantization is deprecated.*", category=DeprecationWarning
        )
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(module, spec, dtype=torch.qint8)


def stream_perplexity(step: Step, ids: Sequence[int] | Tensor, state: list[Tensor], chunk: int = CHUNK) -> float:
    """``exp(mean NLL)`` of every token of ``ids`` but the first, read as one stream from ``state``
    (the runner's zero state of one stream) in chunks of ``chunk`` tokens."""
    stream = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    total, count = 0.0, 0
    for start in range(0, stream.size(1) - 1, chunk):
        inputs = stream[:, start : start + chunk]
        targets = stream[:, start + 1 : start + 1 + chunk]
        log_probs, state = step(inputs[:, : targets.size(1)], state)
        total -= float(log_probs.double().gather(-1, targets.unsqueeze(-1)).sum())
        count += targets.numel()
    return perplexity_of(total, count)
