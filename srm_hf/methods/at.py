"""Attention transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv 1612.03928), together with Hinton KD.

    L = α·T²·KL + (1-α)·CE + β · Σ_taps mean (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)²

The paper writes β/2 times a squared norm, with β = 1000 divided by the number of elements; the authors' code (and
mdistiller's) takes the mean instead and weights it by β = 1000, without the half: so does this file. With
`kd_alpha=0` the loss is CE + β·Σ, the AT of the paper's tables and of mdistiller; with α > 0 it is the paper's
AT+KD.

Pooled-vector taps have no spatial attention and are skipped; student tokens against a teacher map are laid out as
that map (class tokens dropped).
"""

import torch
import torch.nn.functional as F

from .base import Method, StageSpec, check_same_grid, on_teacher_grid
from .kd import kd_terms


def attention_map(feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Activation-based spatial attention: Q = mean over channels of |A|^p, flattened and L2-normalised.

    [N, C, H, W] -> [N, H*W]; tokens [N, L, C] -> [N, L]."""
    a = feature.float().abs().pow(p)
    q = a.mean(dim=1) if feature.dim() == 4 else a.mean(dim=-1)
    return F.normalize(q.flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv 1612.03928) for one pair of taps of equal grid:
    mean of (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)², as the authors' code computes it; their weight is β = 1000 on the sum over
    taps (`DistillationConfig.at_beta`)."""
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()


class AT(Method):
    name = "at"
    uses_taps = True
    config_prefixes = ("at", "kd")
    citation = """@inproceedings{zagoruyko2017at,
  title     = {Paying More Attention to Attention: Improving the Performance of Convolutional Neural Networks via
               Attention Transfer},
  author    = {Zagoruyko, Sergey and Komodakis, Nikos},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2017}
}"""

    def __init__(self, beta: float = 1000.0, kd_alpha: float = 0.5, kd_temperature: float = 4.0):
        super().__init__()
        self.beta, self.kd_alpha, self.kd_temperature = beta, kd_alpha, kd_temperature

    @classmethod
    def from_config(cls, args) -> "AT":
        return cls(args.at_beta, args.kd_alpha, args.kd_temperature)

    def build(self, pairs):
        super().build(pairs)
        check_same_grid(pairs, self.name)
        if not any(pair.teacher.spatial for pair in pairs):
            raise ValueError(f"Method 'at' transfers spatial attention, and every tap pair here is a pooled vector "
                             f"({[pair.teacher.path for pair in pairs]}), so its term would be 0: tap feature maps "
                             "(e.g. the stage outputs), or use method 'kd'.")

    def stages(self) -> list[StageSpec]:
        return [StageSpec("at")]

    def loss(self, stage, student, teacher, labels):
        terms = kd_terms(student.logits, teacher, labels, self.kd_alpha, self.kd_temperature, self.label_smoothing)
        maps = [p for p in self.pairs if p.teacher.spatial]  # attention needs a spatial map
        terms["at"] = self.beta * sum((at_loss(on_teacher_grid(student.features[p.key], p.teacher.spatial),
                                               teacher.features[p.key]) for p in maps),
                                      student.logits.new_zeros((), dtype=torch.float32))
        return terms

    def describe(self) -> dict:
        return {"name": self.name, "beta": self.beta, "kd_alpha": self.kd_alpha, "kd_temperature": self.kd_temperature}
