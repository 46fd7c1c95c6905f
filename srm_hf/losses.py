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


# ---- baselines: the same taps and trainer, only the loss differs ----------------------------------------------


def fitnet_loss(regressed: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss (Romero et al., ICLR 2015, arXiv 1412.6550): MSE between the teacher's hint layer and the
    student's guided layer mapped to the teacher's channels by a regressor (here a 1×1 projection).

    Paper vs code: the paper writes ½‖u_h − r(v_g)‖²; this is its mean over N·C·H·W (scale only)."""
    return F.mse_loss(regressed.float(), teacher_feature.float())


def attention_map(feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Activation-based spatial attention: Q = mean over channels of |A|^p, flattened and L2-normalised.

    [N, C, H, W] -> [N, H*W]; tokens [N, L, C] -> [N, L]."""
    a = feature.float().abs().pow(p)
    q = a.mean(dim=1) if feature.dim() == 4 else a.mean(dim=-1)
    return F.normalize(q.flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, arXiv 1612.03928) for one pair of taps of equal grid:
    mean of (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)², as the authors' code computes it. The paper's default weight is β = 1000,
    applied as β/2 · Σ_taps, together with Hinton KD (`DistillationConfig.at_beta`)."""
    return (attention_map(student_feature, p) - attention_map(teacher_feature, p)).pow(2).mean()
