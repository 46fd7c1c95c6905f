"""Checks run before any compute is spent: what would fail mid-run, or after it, fails here and names the cause.

    check_images(splits.test, "test")          # every image decodes and is of a sane size; names the bad file
    check_output_dir(args.output_dir, bytes)   # the folder is writable and has room for a checkpoint
    check_training(trainer)                    # the trainer's own: output folder, batches, labels, workers
    check_example_batch(batch); label_count(model, pixel_values, "student"); check_buildable(student, method)
                                               # when a trainer is built: its first batch, its models and method

The splits' own checks (no empty split, at least two classes, labels in range) run where the splits are built
(`data.load_image_splits`).
"""

import io
import os
import shutil
import uuid
from collections.abc import Mapping

import torch
import torch.nn as nn
from PIL import Image

from .forward import eval_mode, model_logits
from .label_checks import CheckedLabels, check_labels, check_unlabelled
from .methods.base import Method
from .transforms import to_mode, to_pil

MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own decompression-bomb limit


def check_images(dataset, split: str, max_pixels: int = MAX_IMAGE_PIXELS, batch_size: int = 256,
                 origin: tuple[str, list[int] | None] | None = None) -> None:
    """Decode every image of a split (`image` column) once, so that an unreadable or oversized one stops the run
    before training, named by its file (or row: with `origin`, `ImageSplits.origin[split]`, its row in the split as
    the dataset gives it, before any carve-out or subset)."""
    images = dataset.with_format(None).select_columns(["image"])
    for start in range(0, len(images), batch_size):
        for offset, value in enumerate(images[start : start + batch_size]["image"]):
            try:
                if isinstance(value, dict):  # a file: its header first, so that a bomb is never decoded
                    with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as header:
                        _check_size(header, max_pixels)
                image = to_pil(value)
                _check_size(image, max_pixels)
                if image.mode not in ("L", "RGB"):  # as the transforms will: to 1 channel or 3, whichever models take
                    for channels in (1, 3):
                        to_mode(image, channels)
            except (OSError, ValueError, TypeError, Image.DecompressionBombError) as e:
                path = value.get("path") if isinstance(value, dict) else None
                where = f"{path!r} (split {split!r}, row {start + offset})" if path else \
                    f"at {dataset_row(start + offset, split, origin)}"
                reason = str(e).rstrip(".").removesuffix(". Remove or replace the file")  # `to_pil`'s, said below
                raise ValueError(f"Image {where} cannot be used: {reason}. Remove or replace it (or fix "
                                 "the dataset) and start again (--check_images false skips this check); nothing was "
                                 "trained.") from e


def dataset_row(row: int, split: str, origin: tuple[str, list[int] | None] | None) -> str:
    """Where row `row` of `split` is in the dataset as read: "row 7 of split 'train'" (of its own split, or of the one
    it was carved from)."""
    if origin is None:
        return f"row {row} of split {split!r}"
    read_as, rows = origin
    return f"row {row if rows is None else rows[row]} of split {read_as!r}" + (
        "" if read_as == split and rows is None else f" (row {row} of the {split} set used here)")


def check_split_images(splits) -> None:
    """`check_images` on every split of an `ImageSplits`."""
    for split in ("train", "validation", "test"):
        if getattr(splits, split) is not None:
            check_images(getattr(splits, split), split, origin=splits.origin.get(split))


def _check_size(image: Image.Image, max_pixels: int) -> None:
    if image.width * image.height > max_pixels:
        raise ValueError(f"{image.width}×{image.height} pixels, over the limit of {max_pixels}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"an empty image ({image.width}×{image.height})")


def weights_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def checkpoint_bytes(model: nn.Module) -> int:
    """About what one checkpoint of this model takes: weights and buffers, and two optimizer moments per trained
    parameter (Adam)."""
    return weights_bytes(model) + sum(2 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def check_output_dir(output_dir: str, needed_bytes: int) -> None:
    """`output_dir` can be created and written to, and has `needed_bytes` free."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write_test_{uuid.uuid4().hex}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"Cannot write to output_dir {output_dir!r} ({e.strerror or e}). Choose a writable "
                              "folder (--output_dir), or fix it (permissions, read-only mount, a file in the way); "
                              "nothing was trained.") from e
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise OSError(f"output_dir {output_dir!r} has {free / 2**20:.1f} MiB free, and this run needs about "
                      f"{needed_bytes / 2**20:.1f} MiB (two checkpoints, as the next is written before the last is "
                      "removed, and the final model). Free some space or choose another folder; nothing was trained.")


def norms_on_one_value(model: nn.Module, pixel_values: torch.Tensor) -> list[str]:
    """BatchNorm layers that see one value per channel for a batch of one image (a 1×1 map, or a vector): those
    cannot train on such a batch. Found by one eval-mode forward of a single image."""
    found, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: found.append(name) if args[0][0, 0].numel() == 1 else None))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):  # no compiled graph for this one check
            model(pixel_values[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def check_last_batch(model: nn.Module, pixel_values: torch.Tensor, num_examples: int, batch_size: int,
                     num_processes: int, drop_last: bool) -> None:
    """Refuse a run with batches of one image where BatchNorm would see one value per channel (torch raises mid-run
    there): every batch at batch size 1, or the last batch of an epoch; and one whose every batch is dropped."""
    if drop_last and num_examples < batch_size * num_processes:
        raise ValueError(f"dataloader_drop_last=True drops every batch: the training set has {num_examples} examples, "
                         f"fewer than one batch of {batch_size} (per device) on {num_processes} process(es), so no "
                         "step would run. Set dataloader_drop_last=False or a smaller batch size; nothing was trained.")
    # each process's BatchNorm sees its own batch; over several, accelerate pads the last one (even_batches)
    if not (batch_size == 1 or num_processes == 1 and not drop_last and num_examples % batch_size == 1):
        return
    norms = norms_on_one_value(model, pixel_values)
    if norms:
        every = batch_size == 1 or num_examples < batch_size
        which = "every batch holds" if every else f"with batches of {batch_size} the last batch of every epoch holds"
        fix = "Train with batches of 2 or more" if every else "Set dataloader_drop_last=True or change the batch size"
        raise ValueError(
            f"The training set has {num_examples} examples: {which} one example, on which BatchNorm ({norms[0]}, at a "
            f"1×1 map) cannot train. {fix}; nothing was trained.")


def check_training(trainer) -> None:
    """The trainer's checks before `train()`: the output folder (main process), labels for stages that train on them
    alone, the last batch, and views keyed by epoch that persistent loader workers would freeze."""
    from transformers.trainer_utils import has_length

    args, dataset = trainer.args, trainer.train_dataset
    if args.should_save:
        needed = 2 * checkpoint_bytes(trainer.distill_model) if args.save_strategy != "no" else 0
        check_output_dir(args.output_dir, needed + weights_bytes(trainer.distill_model.student))
    if hasattr(dataset, "set_epoch") and args.dataloader_persistent_workers and args.dataloader_num_workers > 0:
        raise ValueError("Persistent loader workers keep the epoch they started with, so the training set's random "
                         "views (set_epoch) would repeat: set dataloader_persistent_workers=False.")
    collate = trainer.data_collator
    collate = collate.collate if isinstance(collate, CheckedLabels) else collate  # `check_labels` names the split
    if has_length(dataset) and len(dataset) > 0:
        batch = collate([dataset[0]])
        labels_only = [s.name for s in trainer.method.stages() if s.runs_student and not s.uses_teacher]
        if labels_only and batch.get("labels") is None:
            raise ValueError(
                f"Stage {labels_only} of method {trainer.method.name!r} trains on the class labels alone (the teacher "
                "does not run there), but the training batches have no 'labels': give the dataset a label column"
                + (", or set kd_alpha > 0." if "kd" in labels_only else ".")
            )
        if batch.get("labels") is None:
            check_unlabelled(dataset[0])
        check_labels(dataset, collate, trainer.distill_model.num_labels, "training")
        evaluated = trainer.eval_dataset if isinstance(trainer.eval_dataset, dict) else {"": trainer.eval_dataset}
        for name, split in evaluated.items():
            check_labels(split, collate, trainer.distill_model.num_labels, f"evaluation {name}".strip())
        example = batch["pixel_values"].to(args.device)
        sizes = args.stage_batch_sizes or {}  # the stages it does not name use per_device_train_batch_size
        for batch_size in {sizes.get(s.name, args.per_device_train_batch_size) for s in trainer.method.stages()}:
            check_last_batch(trainer.distill_model.student, example, len(dataset), batch_size, args.world_size,
                             args.dataloader_drop_last)


def check_samples(samples: list) -> None:
    """Training samples as the default collator gets them: dicts with no PIL image left in them (a tuple, or an
    image, fails inside it with an error that names neither)."""
    sample = samples[0]
    if not isinstance(sample, Mapping):
        tuples = " (torchvision datasets give (image, label) tuples)" if isinstance(sample, tuple) else ""
        raise ValueError(f"Training samples must be dicts with a 'pixel_values' tensor (and 'labels'); sample 0 is a "
                         f"{type(sample).__name__}{tuples}. Return {{'pixel_values': transform(image), 'labels': "
                         "label} from the dataset's __getitem__ (or its transform), or pass a data_collator that "
                         "batches such samples.")
    images = [k for k, v in sample.items() if isinstance(v, Image.Image)]
    if images:
        raise ValueError(f"Sample 0 holds PIL images under {images}; batches need a float 'pixel_values' tensor [C, H, "
                         "W] per image. Transform the images first: the model's image processor, or "
                         "srm_hf.transforms.ImageTransform (e.g. in dataset.with_transform), or in a data_collator.")


def check_example_batch(batch) -> None:
    """A collated batch is a mapping (a dict, or the `BatchFeature` image processors return) with a float
    'pixel_values' tensor [N, C, H, W]."""
    if not isinstance(batch, Mapping) or "pixel_values" not in batch:
        raise ValueError(
            "Training samples must be dicts with a 'pixel_values' tensor (and 'labels'); got "
            f"{type(batch).__name__} with keys {list(batch) if isinstance(batch, Mapping) else '-'}. "
            "Map the dataset with the model's image processor or transforms first."
        )
    pixels = batch["pixel_values"]
    if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point() or pixels.dim() != 4:
        described = f"{pixels.dtype} of shape {tuple(pixels.shape)}" if isinstance(pixels, torch.Tensor) else \
            type(pixels).__name__
        raise ValueError(f"A batch's 'pixel_values' is {described}; the models need a float tensor [N, C, H, W]. "
                         "Convert the images with the model's image processor or transforms (e.g. ToTensor and "
                         "Normalize, which give floats [C, H, W] per image).")


def check_buildable(student: nn.Module, method: Method) -> None:
    """A method instance not built for another trainer, holding no parameter the optimizer would miss, and a student
    with something to train."""
    if method.built:
        raise ValueError(f"This {type(method).__name__} instance is already built for another trainer (its modules "
                         "are sized for that pairing): pass each DistillationTrainer a fresh instance, e.g. "
                         f"{type(method).__name__}.from_config(args), or method='{method.name}'.")
    direct = [name for name, _ in method.named_parameters(recurse=False)]
    if direct:
        raise ValueError(f"Method {method.name!r} holds the parameters {direct} directly, and the optimizer's groups "
                         "are its child modules (named in StageSpec.trains): they would never train. Put them in a "
                         "child module, e.g. self.extras = nn.ParameterDict(...), and name it in StageSpec.trains.")
    trains_student = any("student" in s.trains for s in method.stages())
    if trains_student and not any(p.requires_grad for p in student.parameters()):
        raise ValueError(f"No parameter of the student ({type(student).__name__}) requires grad, so it cannot be "
                         "trained: unfreeze it (student.requires_grad_(True)), or pass a trainable model.")


def label_count(model: nn.Module, pixel_values: torch.Tensor, role: str, channels_last: bool = False) -> int:
    """How many labels the model predicts, from one eval-mode forward of the first training images; a batch the
    model cannot take is named with the error (and `channels_last`, when the model runs in NHWC)."""
    try:
        with eval_mode(model):
            return model_logits(model(pixel_values)).shape[-1]
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(
            f"The {role} ({type(model).__name__}) cannot take the first training images (pixel_values "
            f"{pixel_values.dtype} of shape {tuple(pixel_values.shape)}): {str(e).strip()}. Give it images of the "
            "channels, size and dtype it takes (its image processor or transforms; teacher_pixel_values when the "
            "teacher takes others)." + (" It runs with channels_last=True: its weights and maps are NHWC, which a "
                                        "`.view` of a map cannot take. Use `.reshape` or `.flatten` in the model, "
                                        "or set channels_last=False." if channels_last else "")
        ) from e
