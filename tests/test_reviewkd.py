"""ReviewKD (Chen et al., CVPR 2021): HCL worked out by hand, ABF shapes, gradients and refused taps."""

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from srm_hf.methods.base import Features
from srm_hf.methods.reviewkd import ABF, ReviewKD, hcl_loss


@dataclass(frozen=True)
class Tap:
    path: str
    channels: int
    spatial: tuple

    @property
    def num_pixels(self) -> int:
        return math.prod(self.spatial)


@dataclass(frozen=True)
class Pair:
    key: str
    teacher: Tap
    student: Tap


def pair(key, student_channels, teacher_channels, spatial, student_spatial=None):
    student_spatial = spatial if student_spatial is None else student_spatial
    return Pair(key, Tap(f"teacher.{key}", teacher_channels, spatial), Tap(f"student.{key}", student_channels,
                                                                          student_spatial))


def stage(progress, steps=10):
    return SimpleNamespace(name="reviewkd", steps=steps, step=round(progress * steps) - 1, progress=progress)


# shallow → deep, as taps come: 8×8 maps, 4×4 maps, pooled vectors; channels differ between student and teacher.
PAIRS = [pair("layer1", 4, 6, (8, 8)), pair("layer2", 8, 12, (4, 4)), pair("pool", 16, 24, ())]


def features(pairs, side, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tap = (lambda p: p.student) if side == "student" else (lambda p: p.teacher)
    return {p.key: torch.randn(n, tap(p).channels, *tap(p).spatial, generator=g) for p in pairs}


def test_hcl_on_a_4x4_map_by_hand():
    teacher = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0..3, 4..7, 8..11, 12..15
    student = torch.zeros(1, 1, 4, 4)
    full = sum(i * i for i in range(16)) / 16  # 1240 / 16 = 77.5
    # 2×2 pooling: block means 2.5, 4.5, 10.5, 12.5. 1×1: the mean 7.5. The 4×4 size is not smaller than the map.
    pooled2 = (2.5**2 + 4.5**2 + 10.5**2 + 12.5**2) / 4
    pooled1 = 7.5**2
    expected = (1 * full + 0.5 * pooled2 + 0.25 * pooled1) / (1 + 0.5 + 0.25)
    assert hcl_loss([student], [teacher]).item() == pytest.approx(expected)


def test_hcl_on_an_8x8_map_keeps_three_pooled_sizes():
    teacher = torch.zeros(1, 1, 8, 8)
    teacher[0, 0, 0, 0] = 8.0  # one non-zero pixel
    student = torch.zeros(1, 1, 8, 8)
    # full: 64/64 = 1; 4×4 (2×2 blocks): one mean of 2 among 16 -> 4/16; 2×2: 0.5² / 4; 1×1: 0.125²
    expected = (1 + 0.5 * 4 / 16 + 0.25 * 0.25 / 4 + 0.125 * 0.125**2) / (1 + 0.5 + 0.25 + 0.125)
    assert hcl_loss([student], [teacher]).item() == pytest.approx(expected)


def test_hcl_on_vectors_and_sum_over_levels():
    student_vec, teacher_vec = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    vec = (1 + 4 + 9 + 16) / 4  # a 1×1 map: only the plain MSE
    assert hcl_loss([student_vec], [teacher_vec]).item() == pytest.approx(vec)
    map_s, map_t = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)  # full MSE 1, 1×1 pooled MSE 1 -> 1
    got = hcl_loss([map_s, student_vec], [map_t, teacher_vec])
    assert got.dtype == torch.float32 and got.item() == pytest.approx(1.0 + vec)


def test_hcl_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="resize"):
        hcl_loss([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 2, 8, 8)])


def test_abf_chain_shapes_deep_to_shallow():
    mid = 5
    deep = ABF(16, mid, 24, fuse=False)
    middle = ABF(8, mid, 12, fuse=True)
    shallow = ABF(4, mid, 6, fuse=True)
    out, res = deep(torch.randn(2, 16))  # a pooled vector, viewed as [2, 16, 1, 1]
    assert out.shape == (2, 24, 1, 1) and res.shape == (2, mid, 1, 1)
    out, res = middle(torch.randn(2, 8, 4, 4), res)
    assert out.shape == (2, 12, 4, 4) and res.shape == (2, mid, 4, 4)
    out, res = shallow(torch.randn(2, 4, 4, 4), res, out_size=(8, 8))  # student grid 4×4, teacher grid 8×8
    assert out.shape == (2, 6, 8, 8) and res.shape == (2, mid, 4, 4)
    with pytest.raises(ValueError, match="residual"):
        middle(torch.randn(2, 8, 4, 4))


def test_build_makes_one_abf_per_pair_and_fuses_all_but_the_deepest():
    method = ReviewKD()
    method.build(PAIRS)
    assert list(method.abfs) == ["layer1", "layer2", "pool"]
    assert method.abfs["pool"].att_conv is None
    assert method.abfs["layer1"].att_conv is not None and method.abfs["layer2"].att_conv is not None
    # mid channels: min(512, the deepest student tap's 16 channels)
    assert {abf.conv1[0].out_channels for abf in method.abfs.values()} == {16}
    assert method.abfs["layer1"].conv1[0].in_channels == 4 and method.abfs["layer1"].conv2[0].out_channels == 6
    explicit = ReviewKD(mid_channels=3)
    explicit.build(PAIRS)
    assert explicit.abfs["layer2"].conv1[0].out_channels == 3


def test_loss_terms_gradients_and_warmup():
    torch.manual_seed(0)
    method = ReviewKD(weight=5.0, ce_weight=1.0, warmup_ratio=0.5)
    method.build(PAIRS)
    student_feats = {k: v.requires_grad_() for k, v in features(PAIRS, "student", seed=1).items()}
    student = Features(torch.zeros(2, 3, requires_grad=True), student_feats)
    teacher = Features(torch.zeros(2, 3), features(PAIRS, "teacher", seed=2))
    labels = torch.tensor([0, 2])
    terms = method.loss(stage(1.0), student, teacher, labels)
    assert set(terms) == {"ce", "review"}
    assert terms["ce"].item() == pytest.approx(math.log(3), rel=1e-6)  # uniform logits over 3 classes
    (terms["ce"] + terms["review"]).backward()
    for key, feat in student_feats.items():
        assert feat.grad is not None and feat.grad.abs().sum() > 0, key
    for name, param in method.abfs.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # Training-mode BN uses batch statistics, so the same inputs give the same HCL: only the ramp changes.
    half = method.loss(stage(0.25), student, teacher, labels)["review"]
    assert half.item() == pytest.approx(0.5 * terms["review"].item(), rel=1e-5)


def test_student_grid_differing_from_the_teacher_is_resized():
    pairs = [pair("layer1", 4, 6, (8, 8), student_spatial=(4, 4)), pair("pool", 8, 12, ())]
    method = ReviewKD()
    method.build(pairs)
    terms = method.loss(stage(1.0), Features(torch.zeros(2, 3), features(pairs, "student")),
                        Features(torch.zeros(2, 3), features(pairs, "teacher")), torch.tensor([0, 1]))
    assert torch.isfinite(terms["review"])


def test_token_taps_and_missing_pairs_are_refused():
    tokens = pair("blocks-3", 8, 12, (16,))
    with pytest.raises(ValueError, match=r"tap 'blocks-3'.*tokens.*layer_pairs"):
        ReviewKD().build([PAIRS[0], tokens])
    with pytest.raises(ValueError, match="at least one tap pair"):
        ReviewKD().build([])


def test_reviewkd_needs_labels_and_reports_settings():
    method = ReviewKD()
    method.build(PAIRS)
    with pytest.raises(ValueError, match="labels"):
        method.loss(stage(1.0), Features(torch.zeros(2, 3), features(PAIRS, "student")),
                    Features(torch.zeros(2, 3), features(PAIRS, "teacher")), None)
    assert method.uses_taps and method.config_prefixes == ("reviewkd",)
    assert method.stages()[0].name == "reviewkd" and method.stages()[0].trains == ("student", "abfs")
    assert method.describe() == {"name": "reviewkd", "weight": 5.0, "ce_weight": 1.0,
                                 "warmup_ratio": pytest.approx(20 / 240), "mid_channels": None}
    args = SimpleNamespace(reviewkd_weight=1.0, reviewkd_ce_weight=0.5, reviewkd_warmup_ratio=0.0,
                           reviewkd_mid_channels=32)
    assert ReviewKD.from_config(args).describe() == {"name": "reviewkd", "weight": 1.0, "ce_weight": 0.5,
                                                     "warmup_ratio": 0.0, "mid_channels": 32}
