"""Each model sees its own preprocessing; grayscale and RGB both ways; one shared random view."""

import numpy as np
import pytest
import timm
import torch
from conftest import hf_resnet
from PIL import Image
from transformers import ViTImageProcessor

from srm_hf.transforms import ImageTransform, Preprocessing, preprocessing_for, to_pil

RGB32 = Preprocessing(3, (32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
GRAY16 = Preprocessing(1, (16, 16), (0.2,), (0.5,))


def test_timm_preprocessing_from_its_data_config():
    model = timm.create_model("test_resnet", in_chans=1, pretrained_cfg_overlay=dict(
        input_size=(1, 28, 28), mean=(0.3,), std=(0.4,), crop_pct=1.0))
    pre = preprocessing_for(model)
    assert (pre.channels, pre.size, pre.mean, pre.std, pre.crop_pct) == (1, (28, 28), (0.3,), (0.4,), 1.0)


def test_transformers_preprocessing_from_processor_or_config():
    processor = ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.1, 0.2, 0.3], image_std=[1, 1, 1])
    pre = preprocessing_for(hf_resnet(), processor)
    assert pre.size == (48, 48) and pre.mean == (0.1, 0.2, 0.3)
    assert preprocessing_for(hf_resnet()).size == (224, 224)  # the config's image_size, ImageNet statistics
    with pytest.raises(ValueError, match="Preprocessing"):
        preprocessing_for(torch.nn.Linear(2, 2))


def test_grayscale_data_for_an_rgb_model_and_the_reverse():
    gray = np.tile(np.arange(32, dtype=np.uint8)[None] * 8, (32, 1))  # a uint8 array, as IDX data comes
    x = ImageTransform(RGB32)({"image": [gray], "label": [0]})["pixel_values"][0]
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0], x[1])
    torch.testing.assert_close(x[0], x[2])
    rgb = Image.new("RGB", (20, 20), (255, 0, 0))
    y = ImageTransform(GRAY16)({"image": [rgb], "label": [1]})["pixel_values"][0]
    assert y.shape == (1, 16, 16)
    expected = (0.299 * 255 // 1 / 255 - 0.2) / 0.5  # luminance of pure red, normalised
    assert abs(y.mean().item() - expected) < 0.01


def test_teacher_and_student_views_differ_in_size_and_normalisation():
    batch = {"image": [Image.new("L", (28, 28), 128)] * 2, "label": [0, 1]}
    out = ImageTransform(GRAY16, RGB32)(batch)
    assert out["pixel_values"][0].shape == (1, 16, 16)
    assert out["teacher_pixel_values"][0].shape == (3, 32, 32)
    assert abs(out["pixel_values"][0].mean().item() - (128 / 255 - 0.2) / 0.5) < 1e-3
    assert abs(out["teacher_pixel_values"][0].mean().item() - (128 / 255 - 0.5) / 0.25) < 1e-3
    assert "teacher_pixel_values" not in ImageTransform(RGB32, RGB32)(batch)  # same preprocessing: one view


def test_random_crop_and_flip_are_shared_by_both_views():
    image = np.zeros((64, 64), dtype=np.uint8)
    image[:, :20] = 255  # a white band on the left
    transform = ImageTransform(GRAY16, Preprocessing(1, (32, 32), (0.0,), (1.0,)), train=True, scale=(0.2, 0.5))
    torch.manual_seed(0)
    whites = []
    for _ in range(20):
        out = transform({"image": [image], "label": [0]})
        student = out["pixel_values"][0] * 0.5 + 0.2  # back to [0, 1]
        teacher = out["teacher_pixel_values"][0]
        whites.append((student.mean().item(), teacher.mean().item()))
    s, t = np.array(whites).T
    assert s.std() > 0.1  # the views really are random
    np.testing.assert_allclose(s, t, atol=0.05)  # and both models saw the same one


def test_undecodable_bytes_are_named():
    with pytest.raises(ValueError, match="cat_3.jpg"):
        to_pil({"bytes": b"\x00\x01", "path": "/data/cat_3.jpg"})


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_a_non_square_image_matches_timms_own_eval_transform(crop_pct):
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("resnet10t", pretrained=False,
                              pretrained_cfg_overlay={"input_size": (3, 64, 64), "crop_pct": crop_pct})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    expected = create_transform(**resolve_data_config({}, model=model))(image)
    ours = ImageTransform(preprocessing_for(model))({"image": [image], "label": [0]})["pixel_values"][0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def images_of(size: tuple[int, int], n: int = 8):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)
    rows = {"image": [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)],
            "label": [i % 4 for i in range(n)]}
    return Dataset.from_dict(rows, features=Features({"image": ImageFeature(), "label": ClassLabel(num_classes=4)}))


def train_two_steps(tmp_path, student, student_pre):
    from conftest import make_config, timm_resnet

    from srm_hf import DistillationTrainer

    teacher = timm_resnet()
    train = images_of((120, 90)).with_transform(ImageTransform(student_pre, preprocessing_for(teacher), train=True))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=train,
                                  args=make_config(tmp_path, method="kd", max_steps=2, per_device_train_batch_size=4))
    trainer.train()
    return trainer


def test_a_deit_style_processor_trains_at_its_crop_size(tmp_path):
    from transformers import DeiTImageProcessor, ViTConfig, ViTForImageClassification

    processor = DeiTImageProcessor(size={"height": 256, "width": 256}, crop_size={"height": 224, "width": 224})
    pre = preprocessing_for(ViTForImageClassification(ViTConfig(image_size=224)), processor)
    assert pre.size == (224, 224) and pre.crop_pct == pytest.approx(224 / 256)
    torch.manual_seed(0)
    student = ViTForImageClassification(ViTConfig(image_size=224, patch_size=32, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, num_labels=4))
    trainer = train_two_steps(tmp_path, student, pre)
    assert trainer.state.global_step == 2 and np.isfinite(trainer.state.log_history[-2]["loss"])


def test_a_one_channel_transformers_resnet_without_processor_trains(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    student = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16],
                                                        depths=[1, 1], num_labels=4))
    pre = preprocessing_for(student)
    assert pre.channels == 1
    batch = next(iter(torch.utils.data.DataLoader(images_of((120, 90)).with_transform(ImageTransform(pre)),
                                                  batch_size=2)))
    assert batch["pixel_values"].shape[1] == 1
    trainer = train_two_steps(tmp_path, student, pre)
    assert trainer.state.global_step == 2


def test_an_image_record_is_read_upright_as_datasets_and_pipeline_read_it():
    import io

    from datasets import Image as ImageFeature
    from PIL import Image

    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° to display
    Image.new("L", (40, 20), 128).save(buffer, format="JPEG", exif=exif.tobytes())
    record = {"bytes": buffer.getvalue(), "path": None}
    assert to_pil(record).size == ImageFeature().decode_example(record).size == (20, 40)


def test_array_images_channels_first_floats_in_0_1_and_out_of_range_values():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_pil(pixels.transpose(2, 0, 1))), pixels)  # [C, H, W], as torch stores them
    assert np.array_equal(np.asarray(to_pil(pixels[:, :, :1].transpose(2, 0, 1))), pixels[:, :, 0])
    assert np.array_equal(np.asarray(to_pil(pixels / 255.0)), pixels)  # torchvision's float convention
    assert np.array_equal(np.asarray(to_pil(pixels.astype(np.int64))), pixels)
    for bad, match in ((np.full((4, 4), 300.0), r"float64 values in \[300.0, 300.0\].*uint8"),
                       (np.full((4, 4), np.nan), "values in"), (np.zeros((2, 4, 4, 3)), r"shape \(2, 4, 4, 3\)"),
                       (np.zeros((5, 6, 7)), r"shape \(5, 6, 7\)")):
        with pytest.raises(ValueError, match=match):
            to_pil(bad)


@pytest.mark.parametrize("mode, array", [("I;16", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16),
                                         ("F", np.linspace(0, 1000, 64 * 64, dtype=np.float32).reshape(64, 64))])
def test_16_and_32_bit_images_are_refused_rather_than_clipped(tmp_path, mode, array):
    image = Image.fromarray(array, mode=mode) if mode != "I;16" else Image.fromarray(array)
    assert image.mode == mode
    image.save(tmp_path / "deep.tiff")
    for value in (image, {"path": str(tmp_path / "deep.tiff"), "bytes": None}):
        with pytest.raises(ValueError, match=f"{mode} image.*would clip them into \\[0, 255\\].*8 bits first"):
            to_pil(value)
    within = Image.fromarray((array.astype(np.float64) / array.max() * 255).astype(array.dtype))  # 0-255: exact
    assert np.array_equal(np.asarray(to_pil(within).convert("L")), np.asarray(within).astype(np.uint8))
