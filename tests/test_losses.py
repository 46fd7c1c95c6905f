"""The shared logit losses, against hand-computed values."""

import math

import pytest
import torch

from srm_hf import kd_loss
from srm_hf.losses import classification_loss


def test_kd_loss_by_hand():
    t, s, temp = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), 2.0
    pt = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    kl = sum(p * math.log(p / 0.5) for p in pt)
    assert kd_loss(s, t, temp).item() == pytest.approx(temp**2 * kl, rel=1e-5)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_is_batch_mean():
    t, s = torch.randn(1, 5), torch.randn(1, 5)
    one = kd_loss(s, t)
    assert kd_loss(s.repeat(3, 1), t.repeat(3, 1)).item() == pytest.approx(one.item(), rel=1e-6)


def test_classification_loss():
    assert classification_loss(torch.zeros(1, 4), torch.tensor([2])).item() == pytest.approx(math.log(4))
