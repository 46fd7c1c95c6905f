"""Hinton knowledge distillation (Hinton, Vinyals, Dean, arXiv 1503.02531): one stage, logits only.

    L = α · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1-α) · CE(z_s, y)

`kd_terms` is the same objective for the methods that end with KD (SRM, FitNet, AT). The default α = 0.5 (with
T = 4) is lower than mdistiller's CIFAR-100 setting (KD_WEIGHT 0.9, CE_WEIGHT 0.1) and equal to its ImageNet one;
the benchmark (`recipes/benchmarks/quality.py`) chooses between 0.5 and 0.9 on validation.
"""

import torch

from ..losses import classification_loss, kd_loss
from .base import Features, Method, StageSpec


def kd_stage(alpha: float) -> StageSpec:
    """The KD stage of a method; with α = 0 it is label CE alone and the teacher does not run."""
    return StageSpec("kd", uses_teacher=alpha > 0)


def kd_terms(student_logits: torch.Tensor, teacher: Features | None, labels: torch.Tensor | None,
             alpha: float, temperature: float, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """{"kd": α·T²·KL, "ce": (1-α)·CE (label-smoothed if asked)}; KD alone when there are no labels, CE alone
    when α = 0, where the teacher did not run (`teacher` is None)."""
    if alpha == 0:
        if labels is None:
            raise ValueError("kd_alpha=0 trains the KD stage on the class labels alone, but the batch has no "
                             "'labels' column: give the dataset labels, or set kd_alpha > 0.")
        return {"ce": classification_loss(student_logits, labels, label_smoothing)}
    if labels is None:
        return {"kd": kd_loss(student_logits, teacher.logits, temperature)}
    return {
        "kd": alpha * kd_loss(student_logits, teacher.logits, temperature),
        "ce": (1 - alpha) * classification_loss(student_logits, labels, label_smoothing),
    }


class KD(Method):
    name = "kd"
    config_prefixes = ("kd",)
    citation = """@article{hinton2015kd,
  title   = {Distilling the Knowledge in a Neural Network},
  author  = {Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff},
  journal = {arXiv preprint arXiv:1503.02531},
  year    = {2015}
}"""

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0):
        super().__init__()
        self.alpha, self.temperature = alpha, temperature

    @classmethod
    def from_config(cls, args) -> "KD":
        return cls(alpha=args.kd_alpha, temperature=args.kd_temperature)

    def stages(self) -> list[StageSpec]:
        return [kd_stage(self.alpha)]

    def loss(self, stage, student, teacher, labels):
        return kd_terms(student.logits, teacher, labels, self.alpha, self.temperature, self.label_smoothing)

    def describe(self) -> dict:
        return {"name": self.name, "alpha": self.alpha, "temperature": self.temperature}
