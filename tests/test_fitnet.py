"""FitNet: the hint loss."""

import pytest
import torch


def test_fitnet_loss_is_mse():
    from srm_hf.methods.fitnet import fitnet_loss

    assert fitnet_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.5)
