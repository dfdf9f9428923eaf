"""AR and TAR (AWD-LSTM 4.6) on hand-computed examples."""

from __future__ import annotations

import torch

from reglm.objectives.activation_reg import activation_reg, temporal_activation_reg


def _example() -> torch.Tensor:
    # B = 2, T = 3, D = 2
    return torch.tensor(
        [
            [[1.0, 2.0], [3.0, 0.0], [0.0, -1.0]],
            [[0.0, 0.0], [1.0, 1.0], [2.0, 4.0]],
        ]
    )


def test_activation_reg_hand_computed() -> None:
    h = _example()
    # squares: 1+4+9+0+0+1 + 0+0+1+1+4+16 = 37 over 12 entries
    torch.testing.assert_close(activation_reg(h, 2.0), torch.tensor(2.0 * 37 / 12))


def test_temporal_activation_reg_hand_computed() -> None:
    h = _example()
    # seq 0 diffs: (2,-2), (-3,-1) -> 4+4+9+1 = 18; seq 1 diffs: (1,1), (1,3) -> 1+1+1+9 = 12
    # 30 over B * (T - 1) * D = 8 entries; no difference is taken across the two sequences.
    torch.testing.assert_close(temporal_activation_reg(h, 1.5), torch.tensor(1.5 * 30 / 8))


def test_zero_coefficient_gives_zero_without_graph() -> None:
    h = _example().requires_grad_()
    for value in (activation_reg(h, 0.0), temporal_activation_reg(h, 0)):
        assert value.shape == () and value.item() == 0.0
        assert value.grad_fn is None


def test_tar_single_step_is_zero() -> None:
    h = torch.randn(3, 1, 4)
    assert temporal_activation_reg(h, 1.0).item() == 0.0


def test_gradients() -> None:
    h = _example().requires_grad_()
    activation_reg(h, 2.0).backward()
    torch.testing.assert_close(h.grad, 2.0 * 2 * h.detach() / h.numel())
    h.grad = None
    temporal_activation_reg(h, 1.0).backward()
    d = h.detach()[:, 1:] - h.detach()[:, :-1]
    expected = torch.zeros_like(h)
    expected[:, 1:] += 2 * d / d.numel()
    expected[:, :-1] -= 2 * d / d.numel()
    torch.testing.assert_close(h.grad, expected)
