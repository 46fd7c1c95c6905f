import math

import pytest
import torch

from srm_hf import dictionary_loss, kd_loss, srm_loss
from srm_hf.losses import classification_loss, pixel_ce_floor


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


def test_fitnet_loss_is_mse():
    from srm_hf.losses import fitnet_loss

    assert fitnet_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(2.5)


def test_attention_map_by_hand():
    from srm_hf.losses import attention_map

    a = torch.tensor([[[[1.0, 0.0]], [[3.0, 0.0]]]])  # [N=1, C=2, H=1, W=2]: mean of squares = [5, 0]
    torch.testing.assert_close(attention_map(a), torch.tensor([[1.0, 0.0]]))
    b = torch.tensor([[[[1.0, 2.0]]]])  # [1, 1, 1, 2]: squares [1, 4] -> normalised [1, 4] / sqrt(17)
    torch.testing.assert_close(attention_map(b), torch.tensor([[1.0, 4.0]]) / math.sqrt(17))


def test_at_loss_by_hand():
    from srm_hf.losses import at_loss

    s = torch.tensor([[[[1.0, 0.0]]]])  # Q = [1, 0]
    t = torch.tensor([[[[0.0, 2.0]]]])  # Q = [0, 1]
    assert at_loss(s, t).item() == pytest.approx((1 + 1) / 2)
    assert at_loss(s, 3 * s).item() == pytest.approx(0.0)  # invariant to the scale of the activations
