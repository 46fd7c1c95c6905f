"""Every split's label column as one ClassLabel: matched by class name across splits, one scalar per image."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value

from srm_hf.class_labels import as_class_labels, labels_of


def split(labels, names=None):
    feature = ClassLabel(names=names) if names else Value("int64")
    return Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)] * len(labels), "label": labels},
                             features=Features({"image": Image(), "label": feature}))


def test_splits_whose_class_labels_number_other_classes_are_matched_by_name():
    # image folders loaded per split: test lacks class 'a', so its own indices 0, 1 are train's 'b', 'c'
    splits, names = as_class_labels({"train": split([0, 1, 2], ["a", "b", "c"]), "test": split([0, 1, -1], ["b", "c"])})
    assert names == ["a", "b", "c"]
    assert labels_of(splits["test"]).tolist() == [1, 2, -1]  # an unlabelled row stays unlabelled
    assert splits["test"].features["label"].names == names and labels_of(splits["train"]).tolist() == [0, 1, 2]
    # a class only the test split has is appended: train's indices are unchanged
    splits, names = as_class_labels({"train": split([0, 1], ["b", "c"]), "test": split([0, 1, 2], ["a", "b", "c"])})
    assert names == ["b", "c", "a"]
    assert labels_of(splits["test"]).tolist() == [2, 0, 1] and labels_of(splits["train"]).tolist() == [0, 1]
    assert splits["train"].features["label"].names == names
    # the same names: nothing is rewritten
    train, test = split([0, 1], ["a", "b"]), split([1, 0], ["a", "b"])
    splits, _ = as_class_labels({"train": train, "test": test})
    assert splits["test"] is test and splits["train"] is train


@pytest.mark.parametrize("feature, value, match", [
    (Sequence(Value("int64")), [0, 1], "holds List|holds Sequence"),
    (Image(), np.zeros((2, 2), np.uint8), "holds Image"),
])
def test_a_label_column_that_is_not_one_scalar_per_image_is_refused(feature, value, match):
    ds = Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)] * 2, "label": [value, value]},
                           features=Features({"image": Image(), "label": feature}))
    with pytest.raises(ValueError, match=f"({match}).*not one class label per image.*--label_column"):
        as_class_labels({"train": ds})
