"""Attention transfer: attention maps and the loss, by hand."""

import math

import pytest
import torch


def test_attention_map_by_hand():
    from srm_hf.methods.at import attention_map

    a = torch.tensor([[[[1.0, 0.0]], [[3.0, 0.0]]]])  # [N=1, C=2, H=1, W=2]: mean of squares = [5, 0]
    torch.testing.assert_close(attention_map(a), torch.tensor([[1.0, 0.0]]))
    b = torch.tensor([[[[1.0, 2.0]]]])  # [1, 1, 1, 2]: squares [1, 4] -> normalised [1, 4] / sqrt(17)
    torch.testing.assert_close(attention_map(b), torch.tensor([[1.0, 4.0]]) / math.sqrt(17))


def test_at_loss_by_hand():
    from srm_hf.methods.at import at_loss

    s = torch.tensor([[[[1.0, 0.0]]]])  # Q = [1, 0]
    t = torch.tensor([[[[0.0, 2.0]]]])  # Q = [0, 1]
    assert at_loss(s, t).item() == pytest.approx((1 + 1) / 2)
    assert at_loss(s, 3 * s).item() == pytest.approx(0.0)  # invariant to the scale of the activations
