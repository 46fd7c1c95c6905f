"""(Fashion-)MNIST IDX files as a `datasets.DatasetDict` with `image` (uint8 [H, W]) and `label` columns.

    splits = load_idx_dir("/usr/share/datasets/fashion-mnist")   # train-images-idx3-ubyte.gz, t10k-..., ...
"""

import gzip
import os
import struct

import numpy as np
import pyarrow as pa
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features

FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a numpy array."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()}).")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} values.")
    return array.reshape(shape)


def _idx_file(directory: str, prefix: str, kind: str) -> str | None:
    for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte", f"{prefix}-{kind}.idx"):
        for path in (os.path.join(directory, name), os.path.join(directory, name + ".gz")):
            if os.path.isfile(path):
                return path
    return None


def is_idx_dir(directory: str) -> bool:
    return os.path.isdir(directory) and _idx_file(directory, "train", "images") is not None


def load_idx_dir(directory: str, label_names: list[str] | None = None) -> DatasetDict:
    """`train-*` and `t10k-*` IDX files (Fashion-MNIST, MNIST) as a DatasetDict with `image` and `label`."""
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = _idx_file(directory, prefix, "images"), _idx_file(directory, prefix, "labels")
        if images is None:
            continue
        if labels is None:
            raise FileNotFoundError(f"{directory} has {images} but no {prefix}-labels-idx1-ubyte[.gz] beside it.")
        x, y = read_idx(images), read_idx(labels)
        if len(x) != len(y):
            raise ValueError(f"{images} holds {len(x)} images but {labels} {len(y)} labels.")
        splits[split] = (x, y)
    if "train" not in splits:
        raise FileNotFoundError(f"No train-images-idx3-ubyte[.gz] in {directory}.")
    if label_names is None:
        num = int(max((y.max() for _, y in splits.values() if len(y)), default=0)) + 1
        fashion = "fashion" in os.path.abspath(directory).lower() and num == len(FASHION_MNIST_LABELS)
        label_names = list(FASHION_MNIST_LABELS) if fashion else [str(i) for i in range(num)]
    h, w = splits["train"][0].shape[1:]
    features = Features({"image": Array2D((h, w), "uint8"), "label": ClassLabel(names=list(label_names))})
    return DatasetDict({split: _array_dataset(x, y, features) for split, (x, y) in splits.items()})


def _array_dataset(images: np.ndarray, labels: np.ndarray, features: Features) -> Dataset:
    """[N, H, W] uint8 images as an Arrow table built in one go (fast for 60k images)."""
    h, w = images.shape[1:]
    rows = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), w)
    table = pa.Table.from_arrays([pa.FixedSizeListArray.from_arrays(rows, h), pa.array(labels.astype(np.int64))],
                                 names=["image", "label"])
    return Dataset(table.cast(features.arrow_schema))
