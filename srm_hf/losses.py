"""Loss functions of srm_hf: pure tensor functions, computed in float32 whatever the input precision.

Shapes follow `srm_hf.srm`: maps [N, K, H, W], tokens [N, L, K] or vectors [N, K].
"""

import math

import torch
import torch.nn.functional as F



def dictionary_loss(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Stage 1: MSE(T, T̂), the mean over all N·C·H·W entries. No ℓ1 term: sparsity comes from top-k alone."""
    return F.mse_loss(reconstruction.float(), features.float())


def srm_loss(
    head_logits: torch.Tensor,
    pixel_labels: torch.Tensor,
    image_labels: torch.Tensor,
    pixel_weight: float = 1.0,
    image_weight: float = 1.0,
    pixel_ce_on_sigmoid: bool = True,
) -> dict[str, torch.Tensor]:
    """Stage 2: the student's head predicts the teacher's sparse-code labels of one tap.

        p = sigmoid(Pᵀ s + c)                      # [N, P, K]
        image term: BCE(mean_pixels p, g)          # g = teacher image labels [N, K]
        pixel term: CE(p, y)                       # y = teacher pixel labels [N, P]

    Paper vs reference code: the reference feeds the *sigmoid outputs* p to the cross-entropy as if they were
    logits, so the pixel term can never fall below log(1 + (K-1)/e). That is the default
    (`pixel_ce_on_sigmoid=True`, what produced the paper's numbers); `False` feeds the raw logits Pᵀ s + c.

    Returns {"pixel": weighted pixel term, "image": weighted image term}; a weight of 0 skips its term.
    """
    logits = head_logits.float()  # [N, K, H, W] / [N, L, K] / [N, K]
    probs = torch.sigmoid(logits)
    if logits.dim() == 3:  # tokens: cross_entropy wants the classes in dim 1
        logits, probs = logits.transpose(1, 2), probs.transpose(1, 2)  # [N, K, L]
    out = {}
    if pixel_weight:
        ce_input = probs if pixel_ce_on_sigmoid else logits  # classes in dim 1, pixels after
        target = pixel_labels.reshape(ce_input.shape[0], *ce_input.shape[2:])  # e.g. a teacher map [N, H, W] for L tokens
        out["pixel"] = pixel_weight * F.cross_entropy(ce_input, target)
    if image_weight:
        image_pred = probs.flatten(2).mean(dim=2) if probs.dim() > 2 else probs  # [N, K]
        # BCE on probabilities, written out so it is safe under autocast; clamped to stay finite.
        image_pred = image_pred.clamp(1e-7, 1 - 1e-7)
        target = image_labels.float()
        bce = -(target * image_pred.log() + (1 - target) * (1 - image_pred).log())
        out["image"] = image_weight * bce.mean()
    return out


def pixel_ce_floor(num_atoms: int) -> float:
    """The lowest value of the paper-mode pixel term: log(1 + (K-1)/e), reached by a one-hot p."""
    return math.log(1 + (num_atoms - 1) / math.e)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD term: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), batch mean. Logits [N, num_labels].

    The full stage-3 objective is α · kd_loss + (1 - α) · CE(z_s, y) (`DistillationTrainer.compute_kd_loss`).
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [N, num_labels]
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [N, num_labels]
    return temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy with the class labels, in float32. Logits [N, num_labels], labels [N]."""
    return F.cross_entropy(logits.float(), labels)
