"""Activation regularization (AR) and temporal activation regularization (TAR), AWD-LSTM 4.6.

Both act only on the final RNN layer (as in Merity et al., 2017). The paper writes them as
``alpha L2(m * h_t)`` and ``beta L2(h_t - h_{t+1})`` with ``L2`` the 2-norm; the coefficients
it reports (alpha = 2, beta = 1, section 5) were tuned with the *mean of squares* over batch,
time and features, as in the reference code, so that is what these functions compute:

* AR:  ``alpha * mean_{b,t,d} (m * h)_{b,t,d}^2`` on the dropped output (``EncoderOutput.output``);
* TAR: ``beta * mean_{b,t<T,d} (h_{b,t+1,d} - h_{b,t,d})^2`` on the undropped output
  (``EncoderOutput.raw_output``), over consecutive steps inside the batch's sequences.

A zero coefficient returns a zero scalar without touching the activations.
"""

from __future__ import annotations

from torch import Tensor

from reglm.objectives.base import TermInputs


def activation_reg(output: Tensor, alpha: float) -> Tensor:
    """AR: ``alpha * mean(output ** 2)``; ``output: (B, T, D)`` is the dropped ``m * h_t``. Scalar."""
    if alpha == 0:
        return output.new_zeros(())
    return alpha * output.pow(2).mean()


def temporal_activation_reg(raw_output: Tensor, beta: float) -> Tensor:
    """TAR: ``beta * mean((h_{t+1} - h_t) ** 2)``; ``raw_output: (B, T, D)`` is the undropped ``h_t``.

    Differences are taken along the time axis only (never across sequences of the batch).
    A sequence of length 1 has no consecutive pair and gives 0. Scalar.
    """
    if beta == 0 or raw_output.size(1) < 2:
        return raw_output.new_zeros(())
    return beta * (raw_output[:, 1:] - raw_output[:, :-1]).pow(2).mean()


class ActivationReg:
    """AR as an objective term (reads the dropped encoder output)."""

    reads = frozenset({"output"})

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def __call__(self, inputs: TermInputs) -> Tensor:
        return activation_reg(inputs.out.output, self.alpha)


class TemporalActivationReg:
    """TAR as an objective term (reads the undropped encoder output)."""

    reads = frozenset({"raw_output"})

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def __call__(self, inputs: TermInputs) -> Tensor:
        return temporal_activation_reg(inputs.out.raw_output, self.beta)
