"""reglm: regularized word-level neural language models (AWD-LSTM, NT-ASGD and friends).

``reglm.load``, ``reglm.from_pretrained`` and ``reglm.TrainedModel`` are imported on first use,
so that the command line starts without importing PyTorch before it needs it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["TrainedModel", "from_pretrained", "load", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("TrainedModel", "load", "from_pretrained"):
        from reglm import api

        return getattr(api, name)
    raise AttributeError(f"module 'reglm' has no attribute {name!r}")
