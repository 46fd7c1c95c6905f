"""Choosing the taps: a dry run of both models, a label-count check, and automatic or explicit pairing."""

import torch.nn as nn

from .config import DistillationConfig
from .hooks import describe_taps, dry_run, pair_taps, stage_taps
from .modeling import TapPair


def plan_taps(teacher: nn.Module, student: nn.Module, batch: dict, args: DistillationConfig) -> list[TapPair]:
    """Dry-run both models on `batch`, check their label counts, and pair their taps (explicit or automatic)."""
    if not isinstance(batch, dict) or "pixel_values" not in batch:
        raise ValueError(
            "Training samples must be dicts with a 'pixel_values' tensor (and 'labels'); got "
            f"{type(batch).__name__} with keys {list(batch) if isinstance(batch, dict) else '-'}. "
            "Map the dataset with the model's image processor or transforms first."
        )
    pixel_values = batch["pixel_values"]
    teacher_pixel_values = batch.get("teacher_pixel_values", pixel_values)
    teacher_pixel_values = teacher_pixel_values.to(next(teacher.parameters()).device)
    pixel_values = pixel_values.to(next(student.parameters()).device)
    teacher_taps, teacher_logits = dry_run(teacher, teacher_pixel_values)
    student_taps, student_logits_ = dry_run(student, pixel_values)
    if teacher_logits.shape[-1] != student_logits_.shape[-1]:
        raise ValueError(
            f"The teacher predicts {teacher_logits.shape[-1]} labels but the student {student_logits_.shape[-1]}. "
            "Create the student with the teacher's label count (num_labels= for transformers, num_classes= for timm)."
        )
    if args.explicit_pairs is None:
        pairs = pair_taps(stage_taps(teacher_taps, args.tap_min_reduction),
                          stage_taps(student_taps, args.tap_min_reduction))
        return [TapPair(t, s) for t, s in pairs]

    teacher_paths, student_paths = zip(*args.explicit_pairs)
    pairs = [TapPair(t, s) for t, s in zip(describe_taps(teacher, teacher_pixel_values, list(teacher_paths)),
                                            describe_taps(student, pixel_values, list(student_paths)))]
    for pair in pairs:
        t, s = pair.teacher, pair.student
        same_grid = t.spatial == s.spatial
        # tokens [N, L, C] against a map: pixels in row-major order, up to 8 leading (class) tokens dropped
        as_tokens = len(s.spatial) == 1 and len(t.spatial) == 2 and 0 <= s.num_pixels - t.num_pixels <= 8
        resizable = args.allow_resize and len(t.spatial) == 2 and len(s.spatial) == 2
        if not (same_grid or as_tokens or resizable):
            raise ValueError(
                f"layer_pairs entry '{t.path}:{s.path}' pairs taps of different grids: teacher {t}, student {s}. "
                "Pick layers with the same spatial size (student tokens may match a teacher map of as many "
                "pixels), or set allow_resize=True (feature maps only)."
            )
    return pairs
