"""Knowledge Review distillation (Chen, Liu, Zhao, Jia, CVPR 2021, arXiv 2104.09044): every tap of the student is
fused with the deeper ones before it is compared with the teacher's tap of the same level.

Going deep → shallow, an attention-based fusion module (ABF) turns the student's tap i and the fused residual of
level i+1 into a prediction of the teacher's tap i and the residual for level i-1. The predictions are compared with
the hierarchical context loss (HCL):

    L = ce_weight · CE(z_s, y) + weight · w(progress) · Σ_i HCL(ABF_i(F_s^i, R^{i+1}), F_t^i)

The ABF modules are training-only: they live on the method, never on the exported student. Defaults follow
megvii-research/mdistiller (`mdistiller/engine/cfg.py` CFG.REVIEWKD, `configs/cifar100/reviewkd.yaml`).

Paper vs public code (mdistiller `mdistiller/distillers/ReviewKD.py`, as the authors' dvlab-research/ReviewKD):
  * The code warms the review weight up linearly over the first 20 of 240 epochs (not part of the paper's loss).
  * Which features: the code compares the student's post-ReLU stage outputs (STU_PREACT False) plus its pooled
    vector with the teacher's pre-ReLU stage outputs (skipping the stem) plus its pooled vector; here the taps are
    whatever `layer_pairs` (or the automatic pairing) gives.
  * When the student's grid differs from the teacher's, the code resizes the fused map (nearest) before the 3×3
    conv and hands on the resized map as residual; here the prediction is resized (bilinear) after the 3×3 conv.
  * Mid channels: min(512, the deepest student tap's channels); the 512 is hard-coded (MAX_MID_CHANNEL is unused).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import classification_loss
from .base import Method, StageSpec, linear_warmup


def _as_map(x: torch.Tensor) -> torch.Tensor:
    """Pooled vectors [N, C] as [N, C, 1, 1]; maps [N, C, H, W] unchanged."""
    return x[:, :, None, None] if x.dim() == 2 else x


class ABF(nn.Module):
    """Attention-based fusion of one level: student map (+ deeper residual) → prediction of the teacher map.

        x   = BN(conv1x1(F_s))                          [N, M, H, W], M = mid channels
        a   = sigmoid(conv1x1([x, up(R)]))              [N, 2, H, W], only when `fuse` (not at the deepest level)
        x   = x · a_0 + up(R) · a_1                      R: the deeper level's residual, nearest-upsampled to H×W
        out = BN(conv3x3(x))                            [N, C_t, H, W], resized (bilinear) to the teacher's grid

    `forward` returns (out, x): x is the residual handed to the next, shallower level.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)  # as the public code
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                out_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.conv1[0].weight.dtype  # a half-precision student's features meet float32 modules
        x = self.conv1(_as_map(x).to(dtype))  # [N, M, H, W]
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("This ABF fuses a deeper level: pass the residual returned by the deeper ABF.")
            residual = F.interpolate(residual.to(x.dtype), size=x.shape[-2:], mode="nearest")  # [N, M, H, W]
            att = self.att_conv(torch.cat([x, residual], dim=1))  # [N, 2, H, W]
            x = x * att[:, 0:1] + residual * att[:, 1:2]  # [N, M, H, W]
        out = self.conv2(x)  # [N, C_t, H, W]
        if out_size is not None and tuple(out.shape[-2:]) != tuple(out_size):
            out = F.interpolate(out, size=tuple(out_size), mode="bilinear", align_corners=False)  # [N, C_t, Ht, Wt]
        return out, x


def hcl_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss, summed over levels. Each pair: maps [N, C, H, W] or vectors [N, C] of equal shape.

    Per level, with P_k the adaptive average pooling to k×k, P_0 the identity and D the mean squared error:

        HCL(F_s, F_t) = Σ_j w_j · D(P_kj F_s, P_kj F_t) / Σ_j w_j

    over k_0 = full resolution (w_0 = 1), then the sizes 4, 2, 1 that are smaller than the map, in that order, each
    with half the previous weight (½, ¼, ⅛).

    Paper vs public code (mdistiller `mdistiller/distillers/ReviewKD.py`, `hcl_loss`; the authors' repo is the same):
      * The paper describes HCL as spatial-pyramid pooling of both maps with an L2 distance at each level of
        context; the pooled sizes (4, 2, 1), the halving weights, the division by the total weight and the use of
        the mean (not the sum) of squared differences are the public code's. Those are used here.
      * The code skips a pooled size k when k ≥ H (height only); here k ≥ min(H, W), the same on square maps.
      * Vectors [N, C] are 1×1 maps: only the plain MSE term remains.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"hcl_loss got {len(student_features)} student and {len(teacher_features)} teacher levels; "
                         "pass one student prediction per teacher feature.")
    total = student_features[0].new_zeros((), dtype=torch.float32)
    for fs, ft in zip(student_features, teacher_features):
        fs, ft = _as_map(fs).float(), _as_map(ft).float()  # [N, C, H, W]
        if fs.shape != ft.shape:
            raise ValueError(f"hcl_loss compares equal shapes; got student {tuple(fs.shape)} vs teacher "
                             f"{tuple(ft.shape)}: resize the student prediction to the teacher's grid first.")
        level, weight, weight_sum = F.mse_loss(fs, ft), 1.0, 1.0
        for k in (4, 2, 1):
            if k >= min(fs.shape[-2:]):
                continue
            weight /= 2
            pooled_s = F.adaptive_avg_pool2d(fs, (k, k))  # [N, C, k, k]
            pooled_t = F.adaptive_avg_pool2d(ft, (k, k))  # [N, C, k, k]
            level = level + weight * F.mse_loss(pooled_s, pooled_t)
            weight_sum += weight
        total = total + level / weight_sum
    return total


class ReviewKD(Method):
    """ReviewKD with label cross-entropy, over the tap pairs (feature maps or pooled vectors, not tokens).

    Defaults, from mdistiller: weight 5.0 (`configs/cifar100/reviewkd.yaml` REVIEWKD_WEIGHT, res32x4→res8x4;
    `cfg.py` has 1.0), CE_WEIGHT 1.0, WARMUP_EPOCHS 20 of SOLVER.EPOCHS 240, and mid channels
    min(512, student channels of the deepest tap) (`ReviewKD.__init__`: `min(512, in_channels[-1])`).
    """

    name = "reviewkd"
    uses_taps = True
    config_prefixes = ("reviewkd",)
    citation = """@inproceedings{chen2021reviewkd,
  title     = {Distilling Knowledge via Knowledge Review},
  author    = {Chen, Pengguang and Liu, Shu and Zhao, Hengshuang and Jia, Jiaya},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2021}
}"""

    def __init__(self, weight: float = 5.0, ce_weight: float = 1.0, warmup_ratio: float = 20 / 240,
                 mid_channels: int | None = None):  # warm-up: mdistiller's 20 epochs of 240; None: min(512, ...)
        super().__init__()
        if not 0 <= warmup_ratio <= 1:
            raise ValueError(f"reviewkd_warmup_ratio={warmup_ratio} must be in [0, 1]: the fraction of the stage over "
                             "which the review weight ramps up (0 disables the warm-up).")
        if mid_channels is not None and mid_channels <= 0:
            raise ValueError(f"reviewkd_mid_channels={mid_channels} must be > 0, or None for min(512, the deepest "
                             "student tap's channels).")
        self.weight, self.ce_weight, self.warmup_ratio = weight, ce_weight, warmup_ratio
        self.mid_channels = mid_channels
        self.abfs = nn.ModuleDict()  # one ABF per tap pair, made by `build`

    @classmethod
    def from_config(cls, args) -> "ReviewKD":
        return cls(weight=args.reviewkd_weight, ce_weight=args.reviewkd_ce_weight,
                   warmup_ratio=args.reviewkd_warmup_ratio, mid_channels=args.reviewkd_mid_channels)

    def build(self, pairs: list) -> None:
        super().build(pairs)
        if not self.pairs:
            raise ValueError("ReviewKD needs at least one tap pair: set `layer_pairs` or use models whose layers can "
                             "be paired by spatial size.")
        for p in self.pairs:
            if len(p.teacher.spatial) == 1 or len(p.student.spatial) == 1:
                raise ValueError(f"ReviewKD fuses feature maps [N, C, H, W] or pooled vectors [N, C], but tap "
                                 f"'{p.key}' (teacher {p.teacher.path}, student {p.student.path}) gives tokens "
                                 "[N, L, C]: choose convolutional or pooled layers in `layer_pairs`.")
        depth = [-math.prod(p.student.spatial) for p in self.pairs]  # fewer pixels: deeper (pooled vectors: 1)
        if depth != sorted(depth):
            raise ValueError("ReviewKD fuses each level with the deeper ones listed after it, but the student taps "
                             f"{[str(p.student) for p in self.pairs]} are not listed shallow to deep: order "
                             "`layer_pairs` from the finest map to the coarsest (pooled vectors last).")
        mid = self.mid_channels or min(512, self.pairs[-1].student.channels)
        last = len(self.pairs) - 1
        self.abfs = nn.ModuleDict({p.key: ABF(p.student.channels, mid, p.teacher.channels, fuse=i < last)
                                   for i, p in enumerate(self.pairs)})  # the deepest level has nothing to fuse

    def stages(self) -> list[StageSpec]:
        return [StageSpec("reviewkd", trains=("student", "abfs"))]

    def loss(self, stage, student, teacher, labels):
        if labels is None:
            raise ValueError("ReviewKD adds a label cross-entropy, but the batch has no labels: give the dataset a "
                             "'labels' column (or set TrainingArguments.label_names).")
        predictions, targets, residual = [], [], None
        for p in reversed(self.pairs):  # deep → shallow: each level fuses the residual of the deeper one
            target = _as_map(teacher.features[p.key])  # [N, C_t, H_t, W_t]
            out, residual = self.abfs[p.key](student.features[p.key], residual, out_size=target.shape[-2:])
            predictions.append(out)  # [N, C_t, H_t, W_t]
            targets.append(target)
        # mdistiller ramps per epoch (weight epoch/20 for 1-based epochs); here the ramp is per optimizer step.
        warmup = linear_warmup(stage.progress, self.warmup_ratio)
        return {
            "ce": self.ce_weight * classification_loss(student.logits, labels, self.label_smoothing),
            "review": self.weight * warmup * hcl_loss(predictions, targets),
        }

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight, "ce_weight": self.ce_weight,
                "warmup_ratio": self.warmup_ratio, "mid_channels": self.mid_channels}
