"""Each model's own preprocessing, and one transform that feeds teacher and student the same view.

    student_pre, teacher_pre = preprocessing_for(student), preprocessing_for(teacher)
    dataset.set_transform(ImageTransform(student_pre, teacher_pre, train=True))
    # -> {"pixel_values": [N, C, H, W], "teacher_pixel_values": ... (only if it differs), "labels": [N]}

During training the random crop and flip are drawn once per image and applied to both views, so teacher and
student features describe the same pixels. Channels follow the model: grayscale data is repeated for an RGB
model, RGB data is converted to luminance for a one-channel model.

`ImageTransform` draws from torch's global generator. `AugmentedDataset` draws each image's view from its own
generator, seeded by (seed, epoch, row): a resumed run sees the very views an uninterrupted one saw, whatever
was prefetched before the checkpoint and however many loader workers or processes there are.

    train = AugmentedDataset(splits.train, ImageTransform(student_pre, teacher_pre, train=True), seed=42)
"""

import io
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

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
    keep_aspect: bool = True  # eval resize: the shorter side (timm, `shortest_edge`), or straight to the size


def _interp(name: str) -> T.InterpolationMode:
    return {"bicubic": T.InterpolationMode.BICUBIC, "nearest": T.InterpolationMode.NEAREST}.get(
        name, T.InterpolationMode.BILINEAR)


def _per_channel(values, channels: int) -> tuple[float, ...]:
    """Statistics for `channels` channels: one value repeated, or RGB statistics averaged for a one-channel model."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"{len(values)} normalisation values for a {channels}-channel model: give 1 or {channels}.")


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
    # without a processor: ImageNet statistics, resized straight to the size (as ViT-style processors do)
    mean, std, crop_pct, keep_aspect = IMAGENET_MEAN, IMAGENET_STD, 1.0, False
    if image_processor is not None:
        proc_size = dict(getattr(image_processor, "size", None) or {})
        resized = proc_size.get("height") or proc_size.get("shortest_edge") or size
        keep_aspect = "shortest_edge" in proc_size
        size = resized
        crop_size = dict(getattr(image_processor, "crop_size", None) or {})
        if getattr(image_processor, "do_center_crop", False) and crop_size.get("height"):
            # e.g. DeiT: resize to 256, then crop 224 -> the model sees 224 px, a crop of 224/256 of the image
            size, crop_pct = (crop_size["height"], crop_size.get("width", crop_size["height"])), \
                crop_size["height"] / resized
        mean = image_processor.image_mean or mean
        std = image_processor.image_std or std
        crop = getattr(image_processor, "crop_pct", None)
        crop_pct = crop if crop else crop_pct
    size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
    return Preprocessing(channels, size, _per_channel(mean, channels), _per_channel(std, channels), crop_pct,
                         keep_aspect=keep_aspect)


def image_processor_for(model: torch.nn.Module, pre: Preprocessing):
    """A transformers image processor that feeds `model` as the eval transform does, to save beside a transformers
    student that came without one (so that `pipeline("image-classification")` works); None for other models."""
    from transformers import ConvNextImageProcessor, PreTrainedModel, ViTImageProcessor

    if not isinstance(model, PreTrainedModel):
        return None
    stats = {"image_mean": list(pre.mean), "image_std": list(pre.std)}
    h, w = pre.size
    if pre.keep_aspect and h == w and h < 384:  # shorter side to h / crop_pct, then a centre crop of h
        return ConvNextImageProcessor(size={"shortest_edge": h}, crop_pct=pre.crop_pct, **stats)
    if pre.crop_pct == 1.0 and not pre.keep_aspect:  # straight to the size
        return ViTImageProcessor(size={"height": h, "width": w}, **stats)
    return None  # no processor class does this eval transform: save none rather than a different one


def to_pil(value) -> Image.Image:
    """A decoded image from a PIL image, an array, or an undecoded `{"bytes", "path"}` record (named on failure;
    turned upright by its EXIF orientation)."""
    if isinstance(value, Image.Image):
        return _eight_bit(value, "an image")
    if isinstance(value, dict):
        path = value.get("path")
        try:
            data = value.get("bytes")
            image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            name = os.path.basename(path) if path else "<in-memory bytes>"
            raise ValueError(f"Cannot read image file {path or name!r}: {str(e).rstrip('.')}. Remove or replace "
                             "the file.") from e
        # upright, as `datasets` and `pipeline()` decode it
        return _eight_bit(ImageOps.exif_transpose(image), f"image file {path!r}" if path else "an image")
    return Image.fromarray(as_image_array(np.asarray(value)))


def _eight_bit(image: Image.Image, name: str) -> Image.Image:
    """Refuse 16- and 32-bit images (modes I, I;16*, F) whose values leave [0, 255]: converting them to 8 bits clips
    them (values within, as `datasets` decodes an integer grayscale array, convert exactly)."""
    if image.mode.startswith("I;16") and image.mode != "I;16":  # byte orders Pillow reads no extrema of
        image = image.convert("I")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        low, high = image.getextrema()
        if low < 0 or high > 255 or (image.mode == "F" and 0 < high <= 1):
            raise ValueError(
                f"{name[0].upper()}{name[1:]} is a {image.mode} image (16 or 32 bits per pixel) with values from {low} "
                f"to {high}: converting it to 8 bits would clip them into [0, 255] (a 16-bit image turns almost "
                "white, floats in [0, 1] black). Convert the images to 8 bits first, scaled to their own range (e.g. "
                "Image.fromarray((array / array.max() * 255).astype('uint8'))).")
    return image


def as_image_array(array: np.ndarray) -> np.ndarray:
    """An array image as PIL reads it: [H, W] or [H, W, 2 | 3 | 4] uint8. Channels first ([C, H, W] with C = 1, 3
    or 4 and W > 4, as torch stores images) move last; floats in [0, 1] (torchvision's convention) are scaled to
    [0, 255]; other shapes, and values outside [0, 255], are refused rather than clipped into another image."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] > 4:
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or array.ndim == 3 and array.shape[2] not in (2, 3, 4):
        raise ValueError(f"An image array of shape {array.shape}: give [H, W], [H, W, C] or [C, H, W] with C = 1 to 4 "
                         "channels.")
    if array.dtype == np.uint8:
        return array
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if np.issubdtype(array.dtype, np.floating) and 0 <= low and high <= 1:
        array = array * 255.0
    elif not (0 <= low and high <= 255):  # NaN fails too
        raise ValueError(f"An image array of {array.dtype} values in [{low}, {high}]: give uint8 values in [0, 255] "
                         "or floats in [0, 1] (16-bit data: scale it to 8 bits first).")
    return np.rint(array).astype(np.uint8)


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """The image in mode L (1 channel) or RGB (3), as the models take it."""
    mode = "L" if channels == 1 else "RGB"
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except ValueError:  # a mode Pillow converts to RGB alone (LAB, HSV: not to L)
        return image.convert("RGB").convert(mode)


def random_resized_crop(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                        generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with an aspect ratio in `ratio` (10 tries,
    then the central crop): torchvision's `RandomResizedCrop` draws, from `generator` (None: the global one)."""
    area, log_ratio = height * width, torch.log(torch.tensor(ratio))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    w = width if in_ratio <= max(ratio) else int(round(height * max(ratio)))
    h = height if in_ratio >= min(ratio) else int(round(width / min(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


class ImageTransform:
    """Batch transform for `datasets.Dataset.set_transform` (see module docstring)."""

    def __init__(self, student: Preprocessing, teacher: Preprocessing | None = None, train: bool = False,
                 scale: tuple[float, float] = (0.8, 1.0), hflip: bool = True):
        self.student, self.train, self.scale, self.hflip = student, train, scale, hflip
        self.teacher = teacher if teacher is not None and teacher != student else None

    def _view(self, image: Image.Image, pre: Preprocessing, crop, flip: bool) -> torch.Tensor:
        image = to_mode(image, pre.channels)
        if crop is not None:
            image = F.resized_crop(image, *crop, size=list(pre.size), interpolation=_interp(pre.interpolation))
        else:  # timm's eval transform: a square size scales the shorter side (aspect kept), then a centre crop
            h, w = pre.size
            shorter = pre.keep_aspect and h == w
            resize = [math.floor(h / pre.crop_pct)] if shorter else [math.floor(s / pre.crop_pct) for s in pre.size]
            image = F.center_crop(F.resize(image, resize, interpolation=_interp(pre.interpolation)), list(pre.size))
        if flip:
            image = F.horizontal_flip(image)
        x = F.to_dtype(F.to_image(image), torch.float32, scale=True)
        return F.normalize(x, list(pre.mean), list(pre.std))

    def __call__(self, batch: dict, generators: list[torch.Generator] | None = None) -> dict:
        """`generators`: one per image for the random view (default: torch's global generator)."""
        out = {"pixel_values": [], "labels": list(batch["label"])}
        if self.teacher is not None:
            out["teacher_pixel_values"] = []
        for n, value in enumerate(batch["image"]):
            image = to_pil(value)
            crop, flip = None, False
            if self.train:
                g = generators[n] if generators is not None else None
                crop = random_resized_crop(image.height, image.width, self.scale, (3 / 4, 4 / 3), g)
                flip = self.hflip and bool(torch.rand((), generator=g) < 0.5)
            out["pixel_values"].append(self._view(image, self.student, crop, flip))
            if self.teacher is not None:
                out["teacher_pixel_values"].append(self._view(image, self.teacher, crop, flip))
        return out


class AugmentedDataset(torch.utils.data.Dataset):
    """A `datasets.Dataset` (columns `image`, `label`) seen through a training `ImageTransform` whose random view of
    row r in epoch e is drawn from a generator seeded by (seed, e, r): reproducible across resumes, loader workers
    and processes. The Trainer sets the epoch (`set_epoch`)."""

    def __init__(self, dataset, transform: ImageTransform, seed: int = 0):
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def generator(self, row: int, later_passes: int = 0) -> torch.Generator:
        epoch = self.epoch + later_passes
        seed = np.random.SeedSequence([self.seed, epoch, row]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(seed))

    pass_in_index = True  # index i >= len reads row i % len in pass i // len after the epoch (`stage_batches.py`)

    def __getitems__(self, rows: list[int]) -> list[dict]:
        n = len(self.dataset)
        out = self.transform(self.dataset[[r % n for r in rows]], [self.generator(r % n, r // n) for r in rows])
        return [{k: v[i] for k, v in out.items()} for i in range(len(rows))]

    def __getitem__(self, row: int) -> dict:
        return self.__getitems__([row])[0]
