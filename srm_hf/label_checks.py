"""Checks of the class labels, before any step and as batches are collated: what would fail inside a loss (an
index error, on CUDA a device-side assert) or silently train without labels fails here, naming the cause.

    check_labels(dataset, collate, num_labels, "training")   # int64 indices in range: all of a `datasets` column
    CheckedLabels(collate, num_labels)                        # the trainer's collator: each batch's labels
    check_unlabelled(sample)                                  # batches without labels: why, and what it means
"""

from collections.abc import Mapping

import torch
from transformers.utils import logging

from .losses import IGNORE_INDEX

logger = logging.get_logger(__name__)


def check_labels(dataset, collate, num_labels: int, split: str) -> None:
    """Class labels the losses can take: int64 indices [N] in [0, num_labels) or IGNORE_INDEX (-100: no label term
    trains on that image) in the split's first sample, and all of
    them where they can be read without decoding images and as the samples give them: the integer 'labels' column of
    a `datasets.Dataset` without a transform (torch would raise mid-run, after earlier stages trained). Other
    datasets (a transform or `target_transform` may map what they store) are checked on their first sample."""
    from transformers.trainer_utils import has_length

    if dataset is None or not has_length(dataset) or len(dataset) == 0:
        return
    labels = collate([dataset[0]]).get("labels")
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.dim() != 1:
        found = f"{labels.dtype} of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else \
            type(labels).__name__
        raise ValueError(f"The {split} batches' labels are {found}; the losses take class indices, int64 of shape [N]. "
                         "Give each sample its class index as an int (one-hot or float labels: argmax / int()).")
    untransformed = getattr(dataset, "format", {}).get("type") != "custom"  # `with_transform` sets "custom"
    if untransformed and "labels" in (getattr(dataset, "column_names", None) or []):
        column = dataset.with_format(None)["labels"]
        if all(isinstance(v, int) for v in column):
            labels = torch.as_tensor(column)
    check_label_range(labels, num_labels, f"The {split} set", ignored=IGNORE_INDEX)


def check_label_range(labels: torch.Tensor, num_labels: int, holder: str, ignored: int | None = None) -> None:
    """Class indices [N] in [0, num_labels) (or `ignored`): one outside fails in the loss, on CUDA as a device-side
    assert."""
    bad = (labels < 0) | (labels >= num_labels)
    if ignored is not None:
        bad &= labels != ignored
    outside = sorted(set(labels[bad].tolist()))
    if outside:
        raise ValueError(f"{holder} has labels {outside[:5]} outside 0-{num_labels - 1}, the {num_labels} classes the "
                         "teacher and the student predict. Remap the labels, drop those samples, or give the models "
                         "the data's label count.")


class CheckedLabels:
    """The trainer's data collator, each batch's class labels checked on the CPU as it is collated (in the loader's
    workers: no device wait). `check_labels` reads all the labels of a `datasets.Dataset` column before any step, but
    only the first sample of other datasets; a bad label further on ends the run here, named, and not as an index
    error inside the loss or, on CUDA, a device-side assert that leaves no checkpoint behind."""

    def __init__(self, collate, num_labels: int):
        self.collate, self.num_labels = collate, num_labels

    def __call__(self, features):
        try:
            batch = self.collate(features)
        except RuntimeError as e:  # torch.stack of images of other sizes: name them, not the collator's internals
            shapes = {tuple(f["pixel_values"].shape) for f in features
                      if isinstance(f, Mapping) and isinstance(f.get("pixel_values"), torch.Tensor)}
            if len(shapes) < 2:
                raise
            raise ValueError(f"A batch of {len(features)} training samples holds 'pixel_values' of {len(shapes)} "
                             f"shapes ({sorted(shapes)[:4]}): a batch needs images of one size. Resize them in the "
                             "dataset's transform (as the model's image processor does).") from e
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and labels.dtype == torch.long and labels.device.type == "cpu":
            # cross-entropy's ignore index: the label terms skip those rows (the KD terms need no label)
            check_label_range(labels, self.num_labels, f"A batch of {len(features)} samples", ignored=IGNORE_INDEX)
        return batch

    def __getattr__(self, name: str):  # the user's collator's own attributes, as `trainer.data_collator.<name>`
        if name == "collate" or name.startswith("__"):  # not set yet (unpickling), or copy / pickle protocol
            raise AttributeError(name)
        return getattr(self.collate, name)


def check_unlabelled(sample) -> None:
    """Training batches without 'labels' (distillation from the teacher alone): refused when the samples hold labels
    the collator dropped (not int class indices), else a warning naming the samples' other keys."""
    held = [k for k in ("labels", "label") if isinstance(sample, Mapping) and sample.get(k) is not None]
    if held:
        raise ValueError(f"The training samples' {held[0]!r} ({sample[held[0]]!r}) did not reach the batches: class "
                         "labels must be int indices. Map them to indices (a datasets ClassLabel column, or the "
                         "models' label2id).")
    others = [k for k in sample if k not in ("pixel_values", "teacher_pixel_values")] if isinstance(sample, Mapping) \
        else []
    logger.warning("The training batches have no 'labels': the method learns from the teacher's outputs alone (no "
                   "label cross-entropy), and evaluation computes no accuracy."
                   + (f" The samples also hold {others}: name the class labels 'labels'." if others else ""))
