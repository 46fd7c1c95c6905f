"""SRM's dictionary and SRM losses (`srm_hf.srm`), against hand-computed values."""

import math

import pytest
import torch

from srm_hf import dictionary_loss, srm_loss
from srm_hf.srm import pixel_ce_floor


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_dictionary_loss_is_plain_mse():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    r = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    assert dictionary_loss(t, r).item() == pytest.approx((4 + 1) / 4)


def test_srm_loss_paper_mode_by_hand():
    logits = torch.tensor([[2.0, 0.0, -2.0]])  # one pooled vector, K = 3
    p = [sig(2), 0.5, sig(-2)]
    g = torch.tensor([[1.0, 0.0, 0.5]])
    out = srm_loss(logits, torch.tensor([0]), g)
    # CE fed the sigmoid outputs as logits
    expected_pixel = -p[0] + math.log(sum(math.exp(v) for v in p))
    expected_image = -(math.log(p[0]) + math.log(1 - p[1]) + 0.5 * math.log(p[2]) + 0.5 * math.log(1 - p[2])) / 3
    assert out["pixel"].item() == pytest.approx(expected_pixel, rel=1e-5)
    assert out["image"].item() == pytest.approx(expected_image, rel=1e-5)


def test_srm_loss_raw_logit_option_by_hand():
    logits = torch.tensor([[2.0, 0.0, -2.0]])
    out = srm_loss(logits, torch.tensor([0]), torch.zeros(1, 3), pixel_ce_on_sigmoid=False)
    assert out["pixel"].item() == pytest.approx(-2 + math.log(math.exp(2) + 1 + math.exp(-2)), rel=1e-5)


def test_image_term_averages_pixels_before_bce():
    logits = torch.tensor([[[[10.0, -10.0]]]])  # [N=1, K=1, H=1, W=2]: p = [~1, ~0], mean 0.5
    out = srm_loss(logits, torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[0.5]]), pixel_weight=0)
    assert "pixel" not in out
    assert out["image"].item() == pytest.approx(math.log(2), rel=1e-4)


@pytest.mark.parametrize("num_atoms", [2, 16, 128])
def test_paper_pixel_ce_floor(num_atoms):
    logits = torch.full((1, num_atoms), -50.0)
    logits[0, 0] = 50.0  # the most confident one-hot prediction possible
    out = srm_loss(logits, torch.tensor([0]), torch.zeros(1, num_atoms), image_weight=0)
    floor = math.log(1 + (num_atoms - 1) / math.e)
    assert pixel_ce_floor(num_atoms) == pytest.approx(floor)
    assert out["pixel"].item() == pytest.approx(floor, rel=1e-5)
    raw = srm_loss(logits, torch.tensor([0]), torch.zeros(1, num_atoms), image_weight=0, pixel_ce_on_sigmoid=False)
    assert raw["pixel"].item() < 1e-6  # raw logits reach zero


def test_srm_weights_scale_terms():
    logits, y, g = torch.randn(2, 4, 3, 3), torch.randint(0, 4, (2, 3, 3)), torch.rand(2, 4)
    base = srm_loss(logits, y, g)
    scaled = srm_loss(logits, y, g, pixel_weight=2.0, image_weight=0.5)
    assert scaled["pixel"].item() == pytest.approx(2 * base["pixel"].item(), rel=1e-6)
    assert scaled["image"].item() == pytest.approx(0.5 * base["image"].item(), rel=1e-6)


def test_srm_loss_is_float32_and_finite_for_half_inputs():
    logits = (torch.randn(2, 8, 4, 4) * 30).to(torch.bfloat16)
    g = torch.zeros(2, 8)
    g[:, 0] = 1.0
    out = srm_loss(logits, torch.randint(0, 8, (2, 4, 4)), g)
    for v in out.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)
