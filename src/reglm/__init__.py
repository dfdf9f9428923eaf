"""reglm: regularized word-level neural language models (AWD-LSTM, NT-ASGD and friends)."""

__version__ = "0.1.0"

from reglm.api import TrainedModel, load  # noqa: E402

__all__ = ["TrainedModel", "load", "__version__"]
