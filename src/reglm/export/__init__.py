"""Export a trained model for inference without reglm: ONNX or TorchScript, float32 or int8.

* :mod:`reglm.export.modules` -- the inference-only module rebuilt from the trained weights (plain
  ``nn.Embedding`` / ``nn.LSTM`` / ``nn.Linear``), joined from the components' own export modules;
* :mod:`reglm.export.onnx`, :mod:`reglm.export.torchscript` -- the two formats and their runners;
* :mod:`reglm.export.quantize` -- int8 dynamic quantization and the perplexity that measures it;
* :mod:`reglm.export.bundle` -- the export directory (:func:`export_model`), checked against
  PyTorch before it is written.

``reglm export RUN --format onnx|torchscript [--quantize int8]`` is the command line
(:mod:`reglm.cli.export`); docs/deployment.md describes the directory and the tensors.
"""

from reglm.export.bundle import FORMATS, QUANTIZATIONS, SPEC_FILE, export_model
from reglm.export.modules import InferenceLM, inference_module

__all__ = ["FORMATS", "QUANTIZATIONS", "SPEC_FILE", "InferenceLM", "export_model", "inference_module"]
