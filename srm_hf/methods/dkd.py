"""Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu, Liang, CVPR 2022, arXiv 2203.08679): one stage, logits only.

The paper splits Hinton KD into a binary "target vs rest" part (TCKD) and a part over the non-target classes only
(NCKD), shows that KD = TCKD + (1 - p_t^T)·NCKD couples them through the teacher's confidence, and weighs them
independently instead:

    L = ce_weight · CE(z_s, y) + w(progress) · (α · TCKD + β · NCKD)

Defaults follow megvii-research/mdistiller (`mdistiller/engine/cfg.py`, the `CFG.DKD` block, used unchanged by
`configs/cifar100/dkd/res32x4_res8x4.yaml`).
"""

import torch
import torch.nn.functional as F

from ..losses import IGNORE_INDEX, classification_loss
from .base import Method, StageSpec, linear_warmup


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """DKD term α·TCKD + β·NCKD, both scaled by T², batch mean. Logits [N, C], labels [N] (class indices).

    With p = softmax(z/T) over the C classes and t the label:

        b      = [p_t, 1 - p_t]                            binary target / non-target distribution
        p̂_i    = exp(z_i/T) / Σ_{j≠t} exp(z_j/T), i ≠ t    distribution among the non-target classes
        TCKD   = KL(b^T ‖ b^S)
        NCKD   = KL(p̂^T ‖ p̂^S)
        DKD    = α · TCKD + β · NCKD                       (Hinton KD is the case α = 1, β = 1 - p_t^T)

    Paper vs public code (mdistiller `mdistiller/distillers/DKD.py`, `dkd_loss`):
      * T² scaling: the paper's equations have no temperature factor; the code multiplies TCKD and NCKD by T²
        (as Hinton KD does to keep gradient sizes independent of T). Done here too.
      * Reduction: the paper leaves it implicit; the code sums the KL over classes and divides by the batch size
        (`size_average=False` then `/ N`), i.e. a batch mean. Done here too (`reduction="batchmean"`).
      * Non-target softmax: the code keeps all C classes and subtracts 1000 from the target logit (after /T) so that
        its probability underflows to ~0; here the target column is removed and the softmax runs over the C-1
        others, which is the paper's p̂ exactly (the two agree to within e^-1000).
      * Binary distribution: the code sums softmax probabilities and takes `torch.log`, which gives log(0) = -inf
        once a model is confident enough for 1 - p_t to round to 0 in float32; here log p_t = z_t/T - lse(z/T) and
        log(1 - p_t) = lse_{j≠t}(z_j/T) - lse(z/T), the same values computed stably.
    """
    n, num_classes = student_logits.shape
    if num_classes < 2:
        raise ValueError(f"DKD needs at least 2 classes to split target and non-target knowledge; got {num_classes}.")
    z_s = student_logits.float() / temperature  # [N, C]
    z_t = teacher_logits.float() / temperature  # [N, C]
    # Gathered rather than masked: a boolean index has a data-dependent size, which makes the host wait for the GPU.
    # Images labelled IGNORE_INDEX (-100, as the cross-entropy ignores them) have no target class to split by: they
    # are left out of the mean, over the labelled images, and count as class 0 for the gathers.
    labelled = labels.long().view(n, 1) != IGNORE_INDEX  # [N, 1]
    target = labels.long().view(n, 1) * labelled  # [N, 1]
    columns = torch.arange(num_classes - 1, device=z_s.device).expand(n, -1)  # [N, C-1]
    other = columns + (columns >= target)  # [N, C-1], every class but the label, in class order
    z_s_other, z_t_other = z_s.gather(1, other), z_t.gather(1, other)  # [N, C-1]

    def binary_log_probs(z: torch.Tensor, z_other: torch.Tensor) -> torch.Tensor:
        log_total = torch.logsumexp(z, dim=1, keepdim=True)  # [N, 1]
        log_p_target = z.gather(1, target) - log_total  # [N, 1]
        log_p_rest = torch.logsumexp(z_other, dim=1, keepdim=True) - log_total  # [N, 1]
        return torch.cat([log_p_target, log_p_rest], dim=1)  # [N, 2]

    def labelled_mean(kl: torch.Tensor) -> torch.Tensor:  # [N, *] -> its sum over the labelled rows / their count
        return (kl.sum(dim=1, keepdim=True) * labelled).sum() / labelled.sum().clamp(min=1)

    tckd = labelled_mean(F.kl_div(binary_log_probs(z_s, z_s_other), binary_log_probs(z_t, z_t_other),
                                  reduction="none", log_target=True))
    nckd = labelled_mean(F.kl_div(F.log_softmax(z_s_other, dim=1), F.log_softmax(z_t_other, dim=1),
                                  reduction="none", log_target=True))
    return temperature**2 * (alpha * tckd + beta * nckd)


class DKD(Method):
    """DKD with label cross-entropy; the DKD term is warmed up linearly over the first `warmup_ratio` of the stage.

    Defaults, from mdistiller `mdistiller/engine/cfg.py` (CFG.DKD): ALPHA 1.0, BETA 8.0, T 4.0, CE_WEIGHT 1.0,
    WARMUP 20 epochs out of SOLVER.EPOCHS 240. Its CIFAR-100 configs lower β for some pairs (`configs/cifar100/dkd/`:
    2.0 for res56→res20 and res110→res32, 6.0 for VGG→VGG and WRN→WRN).
    """

    name = "dkd"
    config_prefixes = ("dkd",)
    citation = """@inproceedings{zhao2022dkd,
  title     = {Decoupled Knowledge Distillation},
  author    = {Zhao, Borui and Cui, Quan and Song, Renjie and Qiu, Yiyu and Liang, Jiajun},
  booktitle = {IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2022}
}"""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, ce_weight: float = 1.0,
                 warmup_ratio: float = 20 / 240):  # mdistiller: 20 warm-up epochs of 240
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"dkd_temperature={temperature} must be > 0 (mdistiller uses 4).")
        if not 0 <= warmup_ratio <= 1:
            raise ValueError(f"dkd_warmup_ratio={warmup_ratio} must be in [0, 1]: the fraction of the stage over "
                             "which the DKD weight ramps up (0 disables the warm-up).")
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup_ratio = ce_weight, warmup_ratio

    @classmethod
    def from_config(cls, args) -> "DKD":
        return cls(alpha=args.dkd_alpha, beta=args.dkd_beta, temperature=args.dkd_temperature,
                   ce_weight=args.dkd_ce_weight, warmup_ratio=args.dkd_warmup_ratio)

    def stages(self) -> list[StageSpec]:
        return [StageSpec("dkd")]

    def loss(self, stage, student, teacher, labels):
        if labels is None:
            raise ValueError("DKD needs the class labels to split target and non-target classes, but the batch has "
                             "none: give the dataset a 'labels' column (or set TrainingArguments.label_names).")
        # mdistiller ramps per epoch (weight epoch/20 for 1-based epochs); here the ramp is per optimizer step.
        warmup = linear_warmup(stage.progress, self.warmup_ratio)
        return {
            "ce": self.ce_weight * classification_loss(student.logits, labels, self.label_smoothing),
            "dkd": warmup * dkd_loss(student.logits, teacher.logits, labels, self.alpha, self.beta, self.temperature),
        }

    def describe(self) -> dict:
        return {"name": self.name, "alpha": self.alpha, "beta": self.beta, "temperature": self.temperature,
                "ce_weight": self.ce_weight, "warmup_ratio": self.warmup_ratio}
