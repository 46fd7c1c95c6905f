"""Image classification data: Hub datasets, local image folders and (Fashion-)MNIST IDX files.

    splits = load_image_splits(DataArguments(dataset_name="uoft-cs/cifar10"))
    splits.train, splits.validation, splits.test   # datasets.Dataset, columns "image" and "label"

Every split is returned with the same two columns, `image` (undecoded: bytes/path, or a uint8 array) and `label`
(a `ClassLabel`), whatever the source schema was. Decoding happens in the transform (`transforms.py`), so an
unreadable file is named when it is met.
"""

import gzip
import os
import struct
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from datasets import Array2D, ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset

from .loading import is_offline

IMAGE_COLUMNS = ("image", "img", "picture", "photo", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target", "coarse_label")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=FASHION_MNIST_HUB,
        metadata={"help": "Hub dataset id. Fashion-MNIST is read from Debian's IDX files when they are installed."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    dataset_dir: str | None = field(
        default=None,
        metadata={"help": "Local data instead of the Hub: an image folder (class subfolders) or a folder of IDX files."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(
        default=None, metadata={"help": "Validation split; default: the dataset's own, else carved from train."}
    )
    test_split: str | None = field(default="test", metadata={"help": "Split for the final evaluation."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of train carved out for validation."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; detected when unset."})
    label_column: str | None = field(default=None, metadata={"help": "Label column; detected when unset."})
    max_train_samples_per_class: int | None = field(
        default=None, metadata={"help": "Keep this many training images per class (stratified, seeded)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap validation and test sizes (seeded)."})
    subset_seed: int = field(default=42, metadata={"help": "Seed of the validation carve-out and of subsampling."})


@dataclass
class ImageSplits:
    train: Dataset
    validation: Dataset
    test: Dataset | None
    label_names: list[str]
    source: str

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))


def detect_columns(columns: list[str], image_column: str | None = None, label_column: str | None = None,
                   split: str = "train") -> tuple[str, str]:
    """Find the image and label columns among the usual names, or check the given ones."""

    def pick(given, candidates, kind, flag):
        if given is not None:
            if given not in columns:
                raise ValueError(f"The {kind} column {given!r} is not in split {split!r}; its columns are {columns}.")
            return given
        for name in candidates:
            if name in columns:
                return name
        raise ValueError(
            f"No {kind} column found in split {split!r} (looked for {list(candidates)}; columns are {columns}). "
            f"Name it with --{flag}."
        )

    return pick(image_column, IMAGE_COLUMNS, "image", "image_column"), pick(label_column, LABEL_COLUMNS, "label",
                                                                            "label_column")


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


def _load_raw(args: DataArguments) -> tuple[DatasetDict, str]:
    if args.dataset_dir is not None:
        if not os.path.isdir(args.dataset_dir):
            raise FileNotFoundError(f"dataset_dir {args.dataset_dir!r} is not a folder.")
        if is_idx_dir(args.dataset_dir):
            return load_idx_dir(args.dataset_dir), f"IDX files in {args.dataset_dir}"
        return load_dataset("imagefolder", data_dir=args.dataset_dir), f"image folder {args.dataset_dir}"
    if args.dataset_name is None:
        raise ValueError("No data: set --dataset_name (a Hub dataset) or --dataset_dir (a local folder).")
    if args.dataset_name in (FASHION_MNIST_HUB, "fashion_mnist") and is_idx_dir(DEBIAN_FASHION_MNIST):
        return load_idx_dir(DEBIAN_FASHION_MNIST), f"Fashion-MNIST IDX files in {DEBIAN_FASHION_MNIST}"
    try:
        return load_dataset(args.dataset_name, args.dataset_config), f"{args.dataset_name} (Hub)"
    except (ConnectionError, OSError) as e:  # offline mode raises ConnectionError/OSError subclasses
        raise ConnectionError(
            f"Could not load the Hub dataset {args.dataset_name!r}{' (HF_HUB_OFFLINE is set)' if is_offline() else ''}: "
            f"{e}. Download it once online, or point --dataset_dir at a local copy."
        ) from e


def _normalise(ds: Dataset, split: str, image_column: str, label_column: str) -> Dataset:
    if len(ds) == 0:
        raise ValueError(f"Split {split!r} is empty: choose another split or check the data source.")
    image_col, label_col = detect_columns(ds.column_names, image_column, label_column, split)
    ds = ds.select_columns([image_col, label_col])
    if image_col != "image":
        ds = ds.rename_column(image_col, "image")
    if label_col != "label":
        ds = ds.rename_column(label_col, "label")
    if isinstance(ds.features["image"], Image):
        ds = ds.cast_column("image", Image(decode=False))  # decoded in the transform, which names bad files
    return ds


def _as_class_labels(splits: dict[str, Dataset]) -> tuple[dict[str, Dataset], list[str]]:
    feature = splits["train"].features["label"]
    if isinstance(feature, ClassLabel):
        return splits, list(feature.names)
    values = set().union(*(set(ds.unique("label")) for ds in splits.values()))
    values = sorted(values, key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v)))
    names = [str(v) for v in values]
    if all(isinstance(v, int) for v in values) and values == list(range(len(values))):
        target = ClassLabel(names=names)
        return {k: ds.cast_column("label", target) for k, ds in splits.items()}, names
    mapping = {v: i for i, v in enumerate(values)}
    target = ClassLabel(names=names)
    out = {}
    for k, ds in splits.items():
        ds = ds.map(lambda b: {"label": [mapping[v] for v in b["label"]]}, batched=True)
        out[k] = ds.cast_column("label", target)
    return out, names


def labels_of(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.with_format("numpy")["label"][:])


def check_labels(ds: Dataset, num_labels: int, split: str) -> None:
    """Every label must index a class: 0 <= label < num_labels."""
    labels = labels_of(ds)
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if bad.size:
        raise ValueError(
            f"Split {split!r} column 'label' has {bad.size} labels outside [0, {num_labels}) "
            f"(e.g. row {bad[0]}: {labels[bad[0]]}). Fix the labels or the number of classes."
        )


def stratified_subset(ds: Dataset, per_class: int, seed: int) -> Dataset:
    """`per_class` examples of every class (all of a smaller class), chosen by a seeded permutation."""
    labels = labels_of(ds)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.permutation(idx)[:per_class].tolist())
    return ds.select(sorted(keep))


def stratified_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off `fraction` of every class (at least one example of each class with two or more)."""
    labels = labels_of(ds)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        held.extend(idx[: max(n, 1 if len(idx) > 1 else 0)].tolist())
    held_set = set(held)
    kept = [i for i in range(len(ds)) if i not in held_set]
    return ds.select(kept), ds.select(sorted(held))


def load_image_splits(args: DataArguments) -> ImageSplits:
    """Train / validation / test splits with `image` and `label` columns (see module docstring)."""
    raw, source = _load_raw(args)
    if args.train_split not in raw:
        raise ValueError(f"No split {args.train_split!r} in {source}; its splits are {list(raw)}.")
    splits = {"train": _normalise(raw[args.train_split], args.train_split, args.image_column, args.label_column)}
    validation = args.validation_split or next(
        (s for s in VALIDATION_SPLITS if s in raw and s != args.test_split), None)
    if validation is not None:
        if validation not in raw:
            raise ValueError(f"No split {validation!r} in {source}; its splits are {list(raw)}.")
        splits["validation"] = _normalise(raw[validation], validation, args.image_column, args.label_column)
    if args.test_split is not None and args.test_split in raw:
        splits["test"] = _normalise(raw[args.test_split], args.test_split, args.image_column, args.label_column)
    splits, names = _as_class_labels(splits)
    if "validation" not in splits:  # carve it from train, stratified
        splits["train"], splits["validation"] = stratified_split(splits["train"], args.validation_fraction,
                                                                 args.subset_seed)
    for split, ds in splits.items():
        check_labels(ds, len(names), split)
    if args.max_train_samples_per_class is not None:
        splits["train"] = stratified_subset(splits["train"], args.max_train_samples_per_class, args.subset_seed)
    if args.max_eval_samples is not None:
        for split in ("validation", "test"):
            if split in splits and len(splits[split]) > args.max_eval_samples:
                splits[split] = splits[split].shuffle(seed=args.subset_seed).select(range(args.max_eval_samples))
    return ImageSplits(splits["train"], splits["validation"], splits.get("test"), names, source)

