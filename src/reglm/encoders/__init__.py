"""Encoders: embedded tokens -> contextual vectors (:class:`~reglm.encoders.base.EncoderOutput`).

``ENCODERS`` maps each ``model.encoder.kind`` to its class, an
:class:`~reglm.encoders.base.Encoder` (its interface and declared optional parts).
"""

from reglm.encoders.awd_lstm import AWDLSTMEncoder
from reglm.encoders.qrnn import QRNNEncoder
from reglm.encoders.transformer import TransformerEncoder
from reglm.encoders.vd_lstm import VDLSTMEncoder

ENCODERS = {
    "awd-lstm": AWDLSTMEncoder,
    "vd-lstm": VDLSTMEncoder,
    "qrnn": QRNNEncoder,
    "transformer": TransformerEncoder,
}

__all__ = ["ENCODERS", "AWDLSTMEncoder", "QRNNEncoder", "VDLSTMEncoder"]
