"""The Fashion-MNIST teacher shipped in recipes/teachers/: it loads with plain timm, scores on the full test split
what its recipe file records (its README says which command trained it), and records the data's label names."""

import json
import sys
from pathlib import Path

import pytest
import timm
import torch

from srm_hf.data import DEBIAN_FASHION_MNIST, DataArguments, load_image_splits
from srm_hf.transforms import ImageTransform, preprocessing_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import distill  # noqa: E402

TEACHERS = Path(__file__).resolve().parent.parent / "recipes" / "teachers"


@pytest.mark.parametrize("name", ["fashion_mnist_resnet18", "fashion_mnist_resnet18_56px"])
def test_shipped_teacher_has_its_recorded_test_accuracy(name):
    TEACHER = TEACHERS / name
    recorded = json.loads((TEACHER / "teacher_recipe.json").read_text())
    assert recorded["metrics"]["test_accuracy"] >= 0.92 and "python recipes/train_teacher.py" in recorded["command"]
    teacher = timm.create_model(f"local-dir:{TEACHER}", pretrained=True).eval()
    assert Path(DEBIAN_FASHION_MNIST).is_dir(), "install Debian's dataset-fashion-mnist package (see README)"
    splits = load_image_splits(DataArguments())
    test = splits.test
    assert len(test) == 10_000
    batch = test.with_transform(ImageTransform(preprocessing_for(teacher)))[:]
    images, labels = torch.stack(batch["pixel_values"]), torch.as_tensor(batch["labels"])
    with torch.no_grad():
        predictions = torch.cat([teacher(x).argmax(-1) for x in images.split(1000)])
    correct = int((predictions == labels).sum())
    # CPUs may round a convolution differently: at most 2 of 10,000 borderline images may flip
    assert abs(correct - round(recorded["metrics"]["test_accuracy"] * 10_000)) <= 2
    recorded_names = [distill.same_label(name) for name in teacher.pretrained_cfg["label_names"]]
    assert recorded_names == [distill.same_label(name) for name in splits.label_names]  # as the recipe checks them
