"""Encoders: embedded tokens -> contextual vectors (:class:`~reglm.encoders.base.EncoderOutput`).

``ENCODERS`` maps each ``model.encoder.kind`` to its class; a class has ``Config`` (its frozen
config dataclass), ``from_config(cfg, input_size)``, ``output_size``, ``layer_sizes``,
``init_state(B, device)`` / ``load_state(raw)`` (the opaque state, or None when stateless) and
``forward(x, state) -> EncoderOutput``.
"""

from reglm.encoders.awd_lstm import AWDLSTMEncoder
from reglm.encoders.vd_lstm import VDLSTMEncoder
from reglm.encoders.qrnn import QRNNEncoder
from reglm.encoders.transformer import TransformerEncoder

ENCODERS = {"awd-lstm": AWDLSTMEncoder, "vd-lstm": VDLSTMEncoder, "qrnn": QRNNEncoder, "transformer": TransformerEncoder}

__all__ = ["ENCODERS", "AWDLSTMEncoder", "QRNNEncoder", "VDLSTMEncoder"]
