"""Random training views that a resumed run reproduces exactly (`AugmentedDataset`)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
from conftest import NUM_LABELS, hf_resnet, make_trainer
from datasets import Array2D, ClassLabel, Dataset, Features

from srm_hf.transforms import AugmentedDataset, ImageTransform, Preprocessing, random_resized_crop

PRE = Preprocessing(3, (32, 32), (0.5,) * 3, (0.25,) * 3)


def image_split(n: int = 36) -> Dataset:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % NUM_LABELS
    images = (rng.integers(0, 60, (n, 40, 40)) + 40 * labels[:, None, None]).astype(np.uint8)
    features = Features({"image": Array2D((40, 40), "uint8"), "label": ClassLabel(num_classes=NUM_LABELS)})
    return Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)


@pytest.mark.parametrize("shape", [(40, 40), (30, 90), (90, 30)])
def test_random_resized_crop_draws_as_torchvision_does(shape):
    torch.manual_seed(3)
    image = torch.zeros(1, *shape)
    expected = [T1.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(50)]
    torch.manual_seed(3)
    assert [random_resized_crop(*shape, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(50)] == expected
    # the central-crop fallback, for a ratio range the image cannot meet
    assert random_resized_crop(*shape, (1.0, 1.0), (2.0, 2.0)) == T1.RandomResizedCrop.get_params(image, [1.0, 1.0],
                                                                                                   [2.0, 2.0])


def test_views_are_a_function_of_seed_epoch_and_row():
    data = AugmentedDataset(image_split(), ImageTransform(PRE, train=True), seed=5)
    first = data[3]["pixel_values"]
    torch.manual_seed(123)  # the global generator plays no part
    assert torch.equal(data.__getitems__([7, 3])[1]["pixel_values"], first)
    data.set_epoch(1)
    assert not torch.equal(data[3]["pixel_values"], first)
    data.set_epoch(0)
    assert torch.equal(data[3]["pixel_values"], first)
    assert not torch.equal(AugmentedDataset(data.dataset, data.transform, seed=6)[3]["pixel_values"], first)


def test_resume_inside_an_epoch_with_augmentation_is_bit_identical(tmp_path):
    # 36 images in batches of 8: 5 steps per epoch; checkpoint-7 is the 2nd step of epoch 2, inside SRM's stage 2
    def train():
        return AugmentedDataset(image_split(), ImageTransform(PRE, train=True), seed=0)

    full = make_trainer(tmp_path / "full", train_dataset=train(), save_strategy="steps", save_steps=7)
    full.train()
    checkpoint = tmp_path / "full" / "out" / "checkpoint-7"
    resumed = make_trainer(tmp_path / "resumed", train_dataset=train(), student=hf_resnet(seed=7))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 12
    a, b = full.distill_model.state_dict(), resumed.distill_model.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
