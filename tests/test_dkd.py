"""DKD (Zhao et al., CVPR 2022): the loss checked against values worked out by hand with `math`."""

import math
from types import SimpleNamespace

import pytest
import torch

from srm_hf.losses import kd_loss
from srm_hf.methods.base import Features
from srm_hf.methods.base import linear_warmup
from srm_hf.methods.dkd import DKD, dkd_loss


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def stage(progress, steps=8):
    """A stage at `progress` = (step + 1) / steps."""
    return SimpleNamespace(name="dkd", steps=steps, step=round(progress * steps) - 1, progress=progress)


# 1 sample, 3 classes, label 0. Student logits (0, 0, 0): p_s = (1/3, 1/3, 1/3).
# Teacher logits (ln 3, 0, ln 2): p_t = (3/6, 1/6, 2/6).
#   binary:      b_s = (1/3, 2/3),  b_t = (1/2, 1/2)    -> TCKD = ½ ln(3/2) + ½ ln(3/4) = ½ ln(9/8)
#   non-target:  p̂_s = (1/2, 1/2),  p̂_t = (1/3, 2/3)    -> NCKD = ⅓ ln(2/3) + ⅔ ln(4/3)
STUDENT = torch.tensor([[0.0, 0.0, 0.0]])
TEACHER = torch.tensor([[math.log(3), 0.0, math.log(2)]])
LABEL = torch.tensor([0])
TCKD = 0.5 * math.log(9 / 8)
NCKD = math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3


def test_dkd_known_value():
    assert dkd_loss(STUDENT, TEACHER, LABEL, alpha=1.0, beta=0.0, temperature=1.0).item() == pytest.approx(TCKD)
    assert dkd_loss(STUDENT, TEACHER, LABEL, alpha=0.0, beta=1.0, temperature=1.0).item() == pytest.approx(NCKD)
    got = dkd_loss(STUDENT, TEACHER, LABEL, alpha=1.0, beta=8.0, temperature=1.0)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(TCKD + 8 * NCKD, rel=1e-5)


def test_dkd_temperature_scales_by_t_squared():
    # Logits doubled at T = 2 give the same distributions as above, so the loss is T² = 4 times the T = 1 value.
    got = dkd_loss(2 * STUDENT, 2 * TEACHER, LABEL, alpha=1.0, beta=8.0, temperature=2.0)
    assert got.item() == pytest.approx(4 * (TCKD + 8 * NCKD), rel=1e-5)


def test_dkd_batch_mean_and_label_position():
    # Second sample: the same case with classes reversed (label 2), plus a third with identical logits (loss 0).
    student = torch.cat([STUDENT, STUDENT.flip(1), torch.tensor([[1.0, 2.0, 3.0]])])
    teacher = torch.cat([TEACHER, TEACHER.flip(1), torch.tensor([[1.0, 2.0, 3.0]])])
    labels = torch.tensor([0, 2, 1])
    got = dkd_loss(student, teacher, labels, alpha=1.0, beta=8.0, temperature=1.0)
    assert got.item() == pytest.approx(2 * (TCKD + 8 * NCKD) / 3, rel=1e-5)


def test_tckd_vanishes_when_target_probabilities_match():
    # Student (0, 1, 0) and teacher (0, 0, 1): both give the target 1/(2 + e), but different non-target splits.
    s, t = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])
    assert softmax([0, 1, 0])[0] == pytest.approx(softmax([0, 0, 1])[0])
    assert dkd_loss(s, t, LABEL, 1.0, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    e = math.e
    nckd = kl([1 / (1 + e), e / (1 + e)], [e / (1 + e), 1 / (1 + e)])  # p̂_t = (1, e)/(1+e), p̂_s = (e, 1)/(1+e)
    assert dkd_loss(s, t, LABEL, 0.0, 1.0, 1.0).item() == pytest.approx(nckd, rel=1e-5)


def test_nckd_vanishes_when_non_target_distributions_match():
    # Only the target logit differs, so p̂ is the same (e, e²)/(e + e²) for both; the binary parts differ.
    s, t = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[3.0, 1.0, 2.0]])
    assert dkd_loss(s, t, LABEL, 0.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    ps, pt = softmax([0, 1, 2])[0], softmax([3, 1, 2])[0]
    assert dkd_loss(s, t, LABEL, 1.0, 0.0, 1.0).item() == pytest.approx(kl([pt, 1 - pt], [ps, 1 - ps]), rel=1e-5)


def test_hinton_kd_is_tckd_plus_confidence_weighted_nckd():
    # The paper's reformulation: KD = TCKD + (1 - p_t^T) · NCKD, with the same T² factor on every term.
    s, t, temperature = torch.tensor([[0.3, -1.2, 2.0, 0.5]]), torch.tensor([[1.5, 0.2, -0.7, 0.9]]), 3.0
    label = torch.tensor([2])
    teacher_target_prob = softmax([v / temperature for v in t[0].tolist()])[2]
    tckd = dkd_loss(s, t, label, 1.0, 0.0, temperature).item()
    nckd = dkd_loss(s, t, label, 0.0, 1.0, temperature).item()
    kd = kd_loss(s, t, temperature).item()
    assert tckd + (1 - teacher_target_prob) * nckd == pytest.approx(kd, rel=1e-5)


def test_dkd_is_zero_for_identical_logits_and_finite_when_confident():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    assert dkd_loss(z, z, torch.tensor([0, 1]), 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    # So confident that 1 - p_t rounds to 0 in float32: still finite.
    confident = torch.tensor([[200.0, 0.0, 0.0]])
    assert torch.isfinite(dkd_loss(confident, TEACHER, LABEL, 1.0, 8.0, 1.0))


def test_images_labelled_minus_100_are_left_out_as_the_cross_entropy_leaves_them():
    """-100 (cross-entropy's ignore index) has no target class to split by: the DKD term is the mean over the labelled
    images alone, and 0 with its gradient finite when none is labelled (the label CE is then NaN, as in torch)."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 4, generator=g).requires_grad_(), torch.randn(5, 4, generator=g)
    labels = torch.tensor([2, -100, 0, -100, 3])
    kept = labels != -100
    got = dkd_loss(student, teacher, labels, 1.0, 8.0, 4.0)
    torch.testing.assert_close(got, dkd_loss(student[kept], teacher[kept], labels[kept], 1.0, 8.0, 4.0))
    got.backward()
    assert torch.equal(student.grad[~kept], torch.zeros(2, 4)) and student.grad[kept].abs().sum() > 0
    none = dkd_loss(student, teacher, torch.full((5,), -100), 1.0, 8.0, 4.0)
    assert none.item() == 0.0
    none.backward()
    assert torch.isfinite(student.grad).all()


def test_dkd_computes_in_float32_and_gives_gradients():
    s = STUDENT.clone().bfloat16().requires_grad_()
    loss = dkd_loss(s, TEACHER.bfloat16(), LABEL, 1.0, 8.0, 4.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("progress, ratio, weight", [
    (1 / 8, 0.25, 0.5), (2 / 8, 0.25, 1.0), (7 / 8, 0.25, 1.0), (1 / 240, 20 / 240, 1 / 20), (1 / 8, 0.0, 1.0),
])
def test_linear_warmup(progress, ratio, weight):
    assert linear_warmup(progress, ratio) == pytest.approx(weight)


def test_dkd_method_terms_with_warmup():
    method = DKD(alpha=1.0, beta=8.0, temperature=1.0, ce_weight=0.5, warmup_ratio=0.25)
    student, teacher = Features(STUDENT), Features(TEACHER)
    # CE of uniform logits is ln 3; DKD is ramped by min(progress / 0.25, 1).
    for progress, weight in [(1 / 8, 0.5), (2 / 8, 1.0), (1.0, 1.0)]:
        terms = method.loss(stage(progress), student, teacher, LABEL)
        assert set(terms) == {"ce", "dkd"}
        assert terms["ce"].item() == pytest.approx(0.5 * math.log(3), rel=1e-6)
        assert terms["dkd"].item() == pytest.approx(weight * (TCKD + 8 * NCKD), rel=1e-5)


def test_dkd_method_needs_labels():
    with pytest.raises(ValueError, match="labels"):
        DKD().loss(stage(0.5), Features(STUDENT), Features(TEACHER), None)


def test_dkd_defaults_settings_and_config():
    method = DKD()
    assert method.describe() == {"name": "dkd", "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "ce_weight": 1.0,
                                 "warmup_ratio": pytest.approx(20 / 240)}
    assert not method.uses_taps and method.config_prefixes == ("dkd",)
    assert [s.name for s in method.stages()] == ["dkd"] and method.stages()[0].trains == ("student",)
    args = SimpleNamespace(dkd_alpha=0.5, dkd_beta=2.0, dkd_temperature=2.0, dkd_ce_weight=0.1, dkd_warmup_ratio=0.0)
    assert DKD.from_config(args).describe() == {"name": "dkd", "alpha": 0.5, "beta": 2.0, "temperature": 2.0,
                                                "ce_weight": 0.1, "warmup_ratio": 0.0}
    with pytest.raises(ValueError, match="warmup_ratio"):
        DKD(warmup_ratio=1.5)
