"""The logit losses shared by several methods: pure tensor functions, computed in float32 whatever the input
precision. Each method's own losses live in its file (`srm_hf.srm`, `srm_hf.methods.*`)."""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # `F.cross_entropy`'s default ignore_index: an image with this label trains no label term


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD term: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean. Logits [N, num_labels].

    The full objective is α · kd_loss + (1 - α) · CE(z_s, y) (`srm_hf.methods.kd.kd_terms`).
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [N, num_labels]
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [N, num_labels]
    return temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0,
                        training: bool = True) -> torch.Tensor:
    """Cross-entropy with the class labels, in float32. Logits [N, num_labels], labels [N].

    With label smoothing ε the target is (1-ε)·one-hot + ε/num_labels, as `TrainingArguments.label_smoothing_factor`
    gives it in the Trainer: (1-ε)·NLL + ε·mean over labels of -log p. The mean is over the labelled images: those
    labelled IGNORE_INDEX (-100) are left out. A batch with none labelled gives 0 in `training` (it trains nothing;
    torch's mean would be NaN), and torch's NaN otherwise: an evaluation loss, where the Trainer's NaN filter leaves
    the batch out of `eval_loss`."""
    if not training:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    total = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)
