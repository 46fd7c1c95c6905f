"""Each model's own preprocessing, and one transform that feeds teacher and student the same view.

    student_pre, teacher_pre = preprocessing_for(student), preprocessing_for(teacher)
    dataset.set_transform(ImageTransform(student_pre, teacher_pre, train=True))
    # -> {"pixel_values": [N, C, H, W], "teacher_pixel_values": ... (only if it differs), "labels": [N]}

During training the random crop and flip are drawn once per image and applied to both views, so teacher and
student features describe the same pixels. Channels follow the model: grayscale data is repeated for an RGB
model, RGB data is converted to luminance for a one-channel model.
"""

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image, UnidentifiedImageError

from .loading import is_timm_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: channels, size, normalisation, and how eval images are cropped."""

    channels: int
    size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"


def _interp(name: str) -> T.InterpolationMode:
    return {"bicubic": T.InterpolationMode.BICUBIC, "nearest": T.InterpolationMode.NEAREST}.get(
        name, T.InterpolationMode.BILINEAR)


def _per_channel(values, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    return values * channels if len(values) == 1 else values


def preprocessing_for(model: torch.nn.Module, image_processor=None) -> Preprocessing:
    """From timm's data config, a transformers image processor, or the model config (ImageNet statistics)."""
    if is_timm_model(model):
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        c, h, w = cfg["input_size"]
        return Preprocessing(c, (h, w), _per_channel(cfg["mean"], c), _per_channel(cfg["std"], c),
                             cfg.get("crop_pct", 1.0) or 1.0, cfg.get("interpolation", "bilinear"))
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(
            f"Cannot tell what preprocessing a {type(model).__name__} expects: build the transform with an explicit "
            "Preprocessing(channels, size, mean, std)."
        )
    channels = getattr(config, "num_channels", 3)
    size = getattr(config, "image_size", 224)
    mean, std, crop_pct = IMAGENET_MEAN, IMAGENET_STD, 1.0
    if image_processor is not None:
        proc_size = getattr(image_processor, "size", None) or {}
        size = proc_size.get("height") or proc_size.get("shortest_edge") or size
        mean = image_processor.image_mean or mean
        std = image_processor.image_std or std
        crop = getattr(image_processor, "crop_pct", None)
        crop_pct = crop if crop else crop_pct
    size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    return Preprocessing(channels, size, _per_channel(mean, channels), _per_channel(std, channels), crop_pct)


def to_pil(value) -> Image.Image:
    """A decoded image from a PIL image, an array, or an undecoded `{"bytes", "path"}` record (named on failure)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        path = value.get("path")
        try:
            data = value.get("bytes")
            image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
            image.load()
            return image
        except (UnidentifiedImageError, OSError) as e:
            name = os.path.basename(path) if path else "<in-memory bytes>"
            raise ValueError(f"Cannot read image file {path or name!r}: {e}. Remove or replace the file.") from e
    array = np.asarray(value)
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    mode = "L" if channels == 1 else "RGB"
    return image if image.mode == mode else image.convert(mode)


class ImageTransform:
    """Batch transform for `datasets.Dataset.set_transform` (see module docstring)."""

    def __init__(self, student: Preprocessing, teacher: Preprocessing | None = None, train: bool = False,
                 scale: tuple[float, float] = (0.8, 1.0), hflip: bool = True):
        self.student, self.train, self.scale, self.hflip = student, train, scale, hflip
        self.teacher = teacher if teacher is not None and teacher != student else None

    def _view(self, image: Image.Image, pre: Preprocessing, crop, flip: bool) -> torch.Tensor:
        image = _to_mode(image, pre.channels)
        if crop is not None:
            image = F.resized_crop(image, *crop, size=list(pre.size), interpolation=_interp(pre.interpolation))
        else:
            resize = [int(s / pre.crop_pct) for s in pre.size]
            image = F.center_crop(F.resize(image, resize, interpolation=_interp(pre.interpolation)), list(pre.size))
        if flip:
            image = F.horizontal_flip(image)
        x = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        return F.normalize(x, list(pre.mean), list(pre.std))

    def __call__(self, batch: dict) -> dict:
        out = {"pixel_values": [], "labels": list(batch["label"])}
        if self.teacher is not None:
            out["teacher_pixel_values"] = []
        for value in batch["image"]:
            image = to_pil(value)
            crop, flip = None, False
            if self.train:
                crop = T.RandomResizedCrop.get_params(image, list(self.scale), [3 / 4, 4 / 3])
                flip = self.hflip and bool(torch.rand(()) < 0.5)
            out["pixel_values"].append(self._view(image, self.student, crop, flip))
            if self.teacher is not None:
                out["teacher_pixel_values"].append(self._view(image, self.teacher, crop, flip))
        return out
