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


def test_at_term_is_beta_times_the_sum_over_taps():
    """The authors' code (and mdistiller's) weights the summed per-tap means by β = 1000, without the paper's half;
    with kd_alpha=0 the rest is the label CE alone."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from srm_hf.methods.at import AT, at_loss

    torch.manual_seed(0)
    maps_s = {"a": torch.randn(2, 3, 4, 4), "b": torch.randn(2, 5, 2, 2)}
    maps_t = {"a": torch.randn(2, 6, 4, 4), "b": torch.randn(2, 7, 2, 2)}
    method = AT(beta=1000.0, kd_alpha=0.0)
    method.pairs = [SimpleNamespace(key=k, teacher=SimpleNamespace(spatial=v.shape[2:])) for k, v in maps_t.items()]
    method.label_smoothing = 0.0
    logits, labels = torch.randn(2, 10), torch.tensor([1, 7])
    terms = method.loss(None, SimpleNamespace(logits=logits, features=maps_s),
                        SimpleNamespace(logits=torch.randn(2, 10), features=maps_t), labels)
    expected = 1000.0 * (at_loss(maps_s["a"], maps_t["a"]) + at_loss(maps_s["b"], maps_t["b"]))
    torch.testing.assert_close(terms["at"], expected)
    torch.testing.assert_close(sum(v for k, v in terms.items() if k != "at"), F.cross_entropy(logits, labels))
