"""Image classification data: Hub datasets, local image folders and (Fashion-)MNIST IDX files.

    splits = load_image_splits(DataArguments(dataset_name="uoft-cs/cifar10"))
    splits.train, splits.validation, splits.test   # datasets.Dataset, columns "image" and "label"

Every split is returned with the same two columns, `image` (undecoded: bytes/path, or a uint8 array) and `label`
(a `ClassLabel`), whatever the source schema was. Decoding happens in the transform (`transforms.py`), so an
unreadable file is named when it is met.
"""

import os
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset, DatasetDict, Image, load_dataset, load_from_disk
from transformers.utils import logging

from .class_labels import as_class_labels, check_labels, labels_of
from .image_folder import check_image_folder
from .idx import FASHION_MNIST_LABELS, is_idx_dir, load_idx_dir, read_idx
from .loading import is_offline

logger = logging.get_logger(__name__)

__all__ = ["FASHION_MNIST_LABELS", "read_idx", "load_idx_dir", "DataArguments", "ImageSplits", "load_image_splits",
           "stratified_subset", "stratified_split", "detect_columns", "labels_of", "check_labels",
           "check_image_folder"]

IMAGE_COLUMNS = ("image", "img", "picture", "photo", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "fine_label", "class", "target", "coarse_label")
VALIDATION_SPLITS = ("validation", "valid", "val", "dev")
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
        metadata={"help": "Local data instead of the Hub: an image folder (class subfolders), a folder of IDX files, "
                          "or a dataset written by `save_to_disk`."},
    )
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str | None = field(
        default=None, metadata={"help": "Validation split; default: the dataset's own, else carved from train."}
    )
    test_split: str | None = field(default="test", metadata={"help": "Split for the final evaluation ('none': none)."})
    validation_fraction: float = field(default=0.1, metadata={"help": "Share of train carved out for validation."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; detected when unset."})
    label_column: str | None = field(default=None, metadata={"help": "Label column; detected when unset."})
    max_train_samples_per_class: int | None = field(
        default=None, metadata={"help": "Keep this many training images per class (stratified, seeded)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap validation and test sizes (seeded)."})
    subset_seed: int = field(default=42, metadata={"help": "Seed of the validation carve-out and of subsampling."})
    check_images: bool = field(
        default=True, metadata={"help": "Decode every image once before training, so that a bad file stops the run "
                                        "before any compute (turn off for very large datasets)."},
    )

    def __post_init__(self):
        if isinstance(self.test_split, str) and self.test_split.lower() in ("none", "null", ""):
            self.test_split = None  # as YAML's null: a flag has no other way to say it
        for name in ("max_train_samples_per_class", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be at least 1: set it to none (null in YAML) to keep every "
                                 "image.")


@dataclass
class ImageSplits:
    train: Dataset
    validation: Dataset
    test: Dataset | None
    label_names: list[str]
    source: str
    fingerprint: str = ""  # the train split's contents as read (datasets' fingerprint), before any subset
    # split -> (the split it was read as, that split's row of each of its rows; None: row for row), for errors
    origin: dict[str, tuple[str, list[int] | None]] = field(default_factory=dict)

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


def saved_to_disk(folder: str) -> bool:
    """Whether `folder` holds a Dataset or DatasetDict written by `save_to_disk`."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("dataset_dict.json", "state.json"))


def _load_from_disk(folder: str) -> tuple[DatasetDict, str]:
    """A dataset written by `save_to_disk`: a DatasetDict as it is, a single Dataset as its train split."""
    data = load_from_disk(folder)
    return (data if isinstance(data, DatasetDict) else DatasetDict(train=data)), f"dataset saved in {folder}"


def _load_raw(args: DataArguments) -> tuple[DatasetDict, str]:
    if args.dataset_dir is not None:
        if not os.path.isdir(args.dataset_dir):
            raise FileNotFoundError(f"dataset_dir {args.dataset_dir!r} is not a folder.")
        if saved_to_disk(args.dataset_dir):
            return _load_from_disk(args.dataset_dir)
        if is_idx_dir(args.dataset_dir):
            return load_idx_dir(args.dataset_dir), f"IDX files in {args.dataset_dir}"
        check_image_folder(args.dataset_dir)
        return load_dataset("imagefolder", data_dir=args.dataset_dir), f"image folder {args.dataset_dir}"
    if args.dataset_name is None:
        raise ValueError("No data: set --dataset_name (a Hub dataset) or --dataset_dir (a local folder).")
    if args.dataset_name in (FASHION_MNIST_HUB, "fashion_mnist") and is_idx_dir(DEBIAN_FASHION_MNIST):
        return load_idx_dir(DEBIAN_FASHION_MNIST), f"Fashion-MNIST IDX files in {DEBIAN_FASHION_MNIST}"
    if os.path.isdir(args.dataset_name) and saved_to_disk(args.dataset_name):  # load_dataset refuses these
        return _load_from_disk(args.dataset_name)
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
    feature = ds.features["image"]
    if isinstance(feature, Image) or getattr(feature, "dtype", None) in ("string", "large_string"):  # or file paths
        ds = ds.cast_column("image", Image(decode=False))  # decoded in the transform, which names bad files
    return ds


def stratified_subset(ds: Dataset, per_class: int, seed: int) -> Dataset:
    """`per_class` examples of every class (all of a smaller class), chosen by a seeded permutation."""
    return ds.select(_subset_rows(ds, per_class, seed))


def stratified_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off `fraction` of every class (at least one example of each class with two or more)."""
    kept, held = _split_rows(ds, fraction, seed)
    return ds.select(kept), ds.select(held)


def _subset_rows(ds: Dataset, per_class: int, seed: int) -> list[int]:
    labels = labels_of(ds)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.extend(rng.permutation(idx)[:per_class].tolist())
    return sorted(keep)


def _split_rows(ds: Dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    labels = labels_of(ds)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = int(round(fraction * len(idx))) if len(idx) > 1 else 0
        held.extend(idx[: max(n, 1 if len(idx) > 1 else 0)].tolist())
    held_set = set(held)
    return [i for i in range(len(ds)) if i not in held_set], sorted(held)


def check_every_class_trains(splits: dict[str, Dataset], names: list[str], source: str) -> None:
    """A class with images in a validation or test split but none in train cannot be learnt and is scored against:
    most often a misspelt folder or label, refused. One with no image anywhere (a label name the data never uses)
    only adds an output that nothing trains: said, and kept."""
    present = set(np.unique(labels_of(splits["train"])).tolist())
    missing = [name for i, name in enumerate(names) if i not in present]
    elsewhere = {split: sorted({names[i] for i in np.unique(labels_of(ds)).tolist() if 0 <= i < len(names)}
                               & set(missing)) for split, ds in splits.items() if split != "train"}
    if any(elsewhere.values()):
        where = "; ".join(f"{split} has {found}" for split, found in elsewhere.items() if found)
        raise ValueError(f"{source}: class(es) {sorted(set().union(*elsewhere.values()))} have no training image "
                         f"({where}). Check their names against the training classes "
                         f"{[n for n in names if n not in missing]} (a typo or a case difference?), or give them "
                         "training images.")
    if missing:
        logger.warning(f"{source}: the label names {missing} have no image in any split; the models keep an output "
                       "for each, which nothing trains.")


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
    elif args.test_split not in (None, "test"):  # the default may be absent: the validation split stands in
        raise ValueError(f"No split {args.test_split!r} in {source}; its splits are {list(raw)}. Pass one of them as "
                         "--test_split, or leave it unset.")
    splits, names = as_class_labels(splits)
    check_every_class_trains(splits, names, source)
    read_as = {"train": args.train_split, "validation": validation, "test": args.test_split}
    rows = {split: list(range(len(ds))) for split, ds in splits.items()}  # each row's row in the split as read

    def select(split: str, kept: list[int], source: str | None = None) -> Dataset:
        rows[split] = [rows[source or split][i] for i in kept]
        return splits[source or split].select(kept)

    if "validation" not in splits:  # carve it from train, stratified
        read_as["validation"] = args.train_split
        kept, held = _split_rows(splits["train"], args.validation_fraction, args.subset_seed)
        splits["validation"] = select("validation", held, source="train")
        splits["train"] = select("train", kept)
    if len(names) < 2:
        raise ValueError(f"{source} has {len(names)} class(es) {names}: a classifier needs two or more.")
    for split, ds in splits.items():
        if len(ds) == 0:
            raise ValueError(f"Split {split!r} of {source} is empty" + (
                f": carving validation_fraction={args.validation_fraction} out of train finds no class with two images "
                "or more. Pass --validation_split, or give each class more training images." if split == "validation"
                else "."))
        check_labels(ds, len(names), split)
    if args.max_train_samples_per_class is not None:
        splits["train"] = select("train", _subset_rows(splits["train"], args.max_train_samples_per_class,
                                                       args.subset_seed))
    if args.max_eval_samples is not None:
        for split in ("validation", "test"):
            if split in splits and len(splits[split]) > args.max_eval_samples:  # as `shuffle(seed).select(range)`
                order = np.random.default_rng(args.subset_seed).permutation(len(splits[split]))
                splits[split] = select(split, order[: args.max_eval_samples].tolist())
    origin = {split: (read_as[split], None if rows[split] == list(range(len(rows[split]))) else rows[split])
              for split in splits}
    return ImageSplits(splits["train"], splits["validation"], splits.get("test"), names, source,
                       raw[args.train_split]._fingerprint, origin)

