"""Loading Hub-style datasets, image folders and IDX files; column detection; stratified subsets; bad data."""

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from srm_hf.data import (
    DataArguments,
    detect_columns,
    labels_of,
    load_idx_dir,
    load_image_splits,
    read_idx,
    stratified_subset,
)
from srm_hf.preflight import check_images, check_split_images
from srm_hf.transforms import ImageTransform, Preprocessing

GRAY = Preprocessing(1, (8, 8), (0.5,), (0.5,))
RGB = Preprocessing(3, (8, 8), (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["img", "label"], ("img", "label")),
        (["image", "labels"], ("image", "labels")),
        (["img", "fine_label", "coarse_label"], ("img", "fine_label")),
        (["image_file_path", "image", "labels"], ("image", "labels")),
    ],
)
def test_column_detection(columns, expected):
    assert detect_columns(columns) == expected


def test_explicit_columns_and_missing_ones():
    assert detect_columns(["photo", "y"], "photo", "y") == ("photo", "y")
    with pytest.raises(ValueError) as err:
        detect_columns(["image", "category"], split="train")
    assert "label column" in str(err.value) and "'category'" in str(err.value) and "--label_column" in str(err.value)
    with pytest.raises(ValueError, match="'cls' is not in split 'test'"):
        detect_columns(["image", "label"], label_column="cls", split="test")


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dir(root, n_train=40, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 6, 5)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", np.arange(n) % 4)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files(tmp_path, gz):
    make_idx_dir(tmp_path, gz=gz)
    x = read_idx(tmp_path / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    assert x.shape == (40, 6, 5) and x.dtype == np.uint8
    ds = load_idx_dir(str(tmp_path))
    assert ds["train"].features["label"].names == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(np.asarray(ds["train"][3]["image"]), x[3])
    splits = load_image_splits(DataArguments(dataset_dir=str(tmp_path), validation_fraction=0.2))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (32, 8, 10)
    assert np.bincount(labels_of(splits.validation)).tolist() == [2, 2, 2, 2]  # stratified carve-out


def test_truncated_idx_file_is_named(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((4, 3, 3)))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(path))


def make_image_folder(root, per_class=6, classes=("cat", "dog", "owl"), mode="RGB"):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            value = (40 * c + i) % 256
            Image.new(mode, (10, 8), (value, 0, 0) if mode == "RGB" else value).save(root / name / f"{i}.png")
    return root


def test_image_folder(tmp_path):
    make_image_folder(tmp_path / "data")
    splits = load_image_splits(DataArguments(dataset_dir=str(tmp_path / "data"), validation_fraction=0.34))
    assert splits.label_names == ["cat", "dog", "owl"]
    assert len(splits.train) + len(splits.validation) == 18 and splits.test is None
    assert np.bincount(labels_of(splits.validation)).tolist() == [2, 2, 2]  # stratified carve-out
    batch = splits.train.with_transform(ImageTransform(GRAY))[:4]
    assert batch["pixel_values"][0].shape == (1, 8, 8) and len(batch["labels"]) == 4


def test_a_class_with_no_training_image_is_refused_naming_where_it_appears(tmp_path):
    make_image_folder(tmp_path / "data" / "train", classes=("ant", "bee"))
    make_image_folder(tmp_path / "data" / "test", classes=("ant", "Bee"), per_class=2)  # a misspelt folder
    with pytest.raises(ValueError, match="class\\(es\\) \\['Bee'\\] have no training image \\(test has \\['Bee'\\]\\)"
                                         ".*training classes \\['ant', 'bee'\\].*case difference"):
        load_image_splits(DataArguments(dataset_dir=str(tmp_path / "data")))
    # a label name no image uses anywhere is kept (an output nothing trains), and said
    names = ClassLabel(names=["cat", "dog", "other"])
    features = Features({"image": ImageFeature(), "label": names})
    DatasetDict({split: Dataset.from_dict({"image": [Image.new("RGB", (5, 5))] * 4, "label": [0, 1, 0, 1]},
                                          features=features) for split in ("train", "test")}).save_to_disk(
        str(tmp_path / "saved"))
    splits = load_image_splits(DataArguments(dataset_dir=str(tmp_path / "saved")))
    assert splits.label_names == ["cat", "dog", "other"]


@pytest.mark.parametrize("extra, named", [
    ("stray.png", "image file\\(s\\) \\['stray.png'\\] directly in"),
    ("cat/more/0.png", "subfolder\\(s\\) \\[.*cat/more'\\] of images inside class"),
    ("bird/sub/0.png", "subfolder\\(s\\) \\[.*bird/sub'\\] of images inside class"),
])
def test_images_at_two_depths_are_refused_naming_what_to_move(tmp_path, extra, named):
    make_image_folder(tmp_path / "data")
    (tmp_path / "data" / extra).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 8)).save(tmp_path / "data" / extra)
    with pytest.raises(ValueError, match=f"{named}.*Move them into their class folder"):
        load_image_splits(DataArguments(dataset_dir=str(tmp_path / "data")))


def test_a_class_folder_linked_in_is_refused_not_dropped(tmp_path):
    """The loader does not follow a linked class folder: its class vanished, and the student had one class less."""
    make_image_folder(tmp_path / "data", classes=("cat", "dog"))
    make_image_folder(tmp_path / "elsewhere", classes=("owl",))
    (tmp_path / "data" / "owl").symlink_to(tmp_path / "elsewhere" / "owl", target_is_directory=True)
    with pytest.raises(ValueError, match="owl'\\] are symbolic links to folders.*Copy the folder in"):
        load_image_splits(DataArguments(dataset_dir=str(tmp_path / "data")))


def test_an_image_column_of_file_paths_is_read_as_the_files(tmp_path):
    make_image_folder(tmp_path / "data")
    paths = sorted(str(p) for p in (tmp_path / "data").rglob("*.png"))  # as a CSV of paths gives them
    Dataset.from_dict({"image": paths, "label": [Path(p).parent.name for p in paths]}).save_to_disk(tmp_path / "csv")
    splits = load_image_splits(DataArguments(dataset_dir=str(tmp_path / "csv"), validation_fraction=0.34))
    assert splits.label_names == ["cat", "dog", "owl"]
    check_images(splits.train, "train")  # every file decodes
    batch = splits.train.with_transform(ImageTransform(GRAY))[:2]
    assert batch["pixel_values"][0].shape == (1, 8, 8)


def test_images_in_modes_pillow_converts_only_some_ways_pass_the_check_and_train(tmp_path):
    """LAB converts to RGB but not to L directly; a big-endian 16-bit image has no extrema until read as I."""
    make_image_folder(tmp_path / "data", per_class=4, classes=("cat", "dog"))
    Image.new("RGB", (10, 8), (200, 30, 60)).convert("LAB").save(tmp_path / "data" / "cat" / "lab.tif")
    values = (np.arange(80).reshape(8, 10) * 2).astype(">u2")
    Image.frombytes("I;16B", (10, 8), values.tobytes()).save(tmp_path / "data" / "dog" / "big_endian.tif")
    splits = load_image_splits(DataArguments(dataset_dir=str(tmp_path / "data"), validation_fraction=0.2))
    check_split_images(splits)
    for pre in (GRAY, RGB):
        ds = splits.train.with_transform(ImageTransform(pre))
        assert all(ds[i]["pixel_values"].shape[0] == pre.channels for i in range(len(ds)))


def test_unreadable_image_is_named(tmp_path):
    make_image_folder(tmp_path / "data")
    (tmp_path / "data" / "dog" / "broken.png").write_bytes(b"not a png at all")
    splits = load_image_splits(DataArguments(dataset_dir=str(tmp_path / "data"), validation_fraction=0.1))
    ds = splits.train.with_transform(ImageTransform(GRAY))
    with pytest.raises(ValueError, match="broken.png"):
        for i in range(len(ds)):
            ds[i]


def hub_style_dataset(root, splits=("train", "test"), n=24, label_column="fine_label", other="coarse_label"):
    """A local parquet dataset with a CIFAR-100-like schema, loaded through `load_dataset` like a Hub one."""
    rng = np.random.default_rng(1)
    features = Features({"img": ImageFeature(), label_column: ClassLabel(names=["a", "b", "c"]),
                         other: Value("int64")})
    for split in splits:
        rows = {"img": [Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)) for _ in range(n)],
                label_column: [i % 3 for i in range(n)], other: [0] * n}
        Dataset.from_dict(rows, features=features).to_parquet(str(root / f"{split}.parquet"))
    return str(root)


def test_hub_style_schema_through_load_dataset(tmp_path):
    name = hub_style_dataset(tmp_path)
    splits = load_image_splits(DataArguments(dataset_name=name, validation_fraction=0.25))
    assert splits.train.column_names == ["image", "label"] and splits.label_names == ["a", "b", "c"]
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (18, 6, 24)


@pytest.mark.parametrize("bad, subset, used_as", [(13, {}, "train"), (14, {}, "validation"),
                                                   (25, {"max_train_samples_per_class": 12}, "train"),
                                                   (19, {"max_eval_samples": 5}, "validation")])
def test_a_bad_image_is_named_by_its_row_in_the_split_as_read(tmp_path, bad, subset, used_as):
    """Images stored in the dataset (no file path to name): the row named is the one in the split the dataset gives,
    not in the set left after the validation carve-out, the per-class subset or the evaluation subset."""
    def png(i):
        out = io.BytesIO()
        Image.fromarray(np.full((4, 4, 3), i, dtype=np.uint8)).save(out, format="PNG")
        return out.getvalue()

    images = [{"bytes": png(i), "path": None} for i in range(40)]
    images[bad] = {"bytes": b"not an image", "path": None}
    Dataset.from_dict({"image": images, "label": [i % 2 for i in range(40)]},
                      features=Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])})
                      ).save_to_disk(tmp_path / "data")
    args = DataArguments(dataset_dir=str(tmp_path / "data"), validation_fraction=0.3, **subset)
    splits = load_image_splits(args)
    read_as, rows = splits.origin[used_as]
    assert read_as == "train" and bad in rows and rows.index(bad) != bad  # the row moved
    with pytest.raises(ValueError, match=rf"Image at row {bad} of split 'train' \(row {rows.index(bad)} of the "
                                         rf"{used_as} set used here\) cannot be used"):
        check_split_images(splits)


def test_stratified_subset_is_stratified_and_reproducible():
    ds = Dataset.from_dict({"id": list(range(100)), "label": [i % 5 for i in range(100)]},
                           features=Features({"id": Value("int64"), "label": ClassLabel(num_classes=5)}))
    a, b = stratified_subset(ds, 3, seed=0), stratified_subset(ds, 3, seed=0)
    assert np.bincount(labels_of(a)).tolist() == [3] * 5
    assert a["id"][:] == b["id"][:]
    assert stratified_subset(ds, 3, seed=1)["id"][:] != a["id"][:]
    assert len(stratified_subset(ds, 50, seed=0)) == 100  # a class smaller than the cap is kept whole


def test_max_train_samples_per_class(tmp_path):
    make_idx_dir(tmp_path, n_train=80)
    splits = load_image_splits(DataArguments(dataset_dir=str(tmp_path), max_train_samples_per_class=5))
    assert np.bincount(labels_of(splits.train)).tolist() == [5, 5, 5, 5]


def test_empty_split(tmp_path):
    make_idx_dir(tmp_path, n_test=0)
    with pytest.raises(ValueError, match="Split 'test' is empty"):
        load_image_splits(DataArguments(dataset_dir=str(tmp_path)))


def test_labels_outside_num_labels(tmp_path):
    name = hub_style_dataset(tmp_path, splits=("train",), label_column="label")
    # an unlabelled test split marks its labels -1, a common Hub convention
    Dataset.from_dict({"img": [Image.new("RGB", (5, 5))] * 3, "label": [0, -1, 1], "coarse_label": [0] * 3},
                      features=Features({"img": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"]),
                                         "coarse_label": Value("int64")})).to_parquet(str(tmp_path / "test.parquet"))
    with pytest.raises(ValueError) as err:
        load_image_splits(DataArguments(dataset_name=name))
    assert "Split 'test' column 'label'" in str(err.value) and "outside [0, 3)" in str(err.value)


def test_missing_label_column_in_data(tmp_path):
    name = hub_style_dataset(tmp_path, label_column="category", other="source_id")
    with pytest.raises(ValueError, match="--label_column"):
        load_image_splits(DataArguments(dataset_name=name))
    splits = load_image_splits(DataArguments(dataset_name=name, label_column="category"))
    assert splits.label_names == ["a", "b", "c"]


def test_an_unlabelled_test_split_says_how_to_skip_it_and_none_skips_it(tmp_path):
    name = hub_style_dataset(tmp_path, splits=("train",), label_column="label")
    Dataset.from_dict({"img": [Image.new("RGB", (5, 5))] * 3, "label": [-1] * 3, "coarse_label": [0] * 3},
                      features=Features({"img": ImageFeature(), "label": Value("int64"),
                                         "coarse_label": Value("int64")})).to_parquet(str(tmp_path / "test.parquet"))
    with pytest.raises(ValueError, match="Split 'test' has no labels.*--test_split none"):
        load_image_splits(DataArguments(dataset_name=name))
    for flag in ("none", "None", "null", ""):
        assert DataArguments(dataset_name=name, test_split=flag).test_split is None
    assert load_image_splits(DataArguments(dataset_name=name, test_split="none")).test is None


def test_a_dataset_written_by_save_to_disk_loads_from_dataset_dir_or_dataset_name(tmp_path):
    splits = load_image_splits(DataArguments(dataset_name=hub_style_dataset(tmp_path / "src"),
                                             validation_fraction=0.25))
    whole = DatasetDict(train=splits.train, test=splits.test)
    whole.save_to_disk(str(tmp_path / "dict"))
    splits.train.save_to_disk(str(tmp_path / "single"))
    for args in (DataArguments(dataset_dir=str(tmp_path / "dict")), DataArguments(dataset_name=str(tmp_path / "dict"))):
        loaded = load_image_splits(args)
        assert loaded.label_names == ["a", "b", "c"] and len(loaded.test) == 24 and "(Hub)" not in loaded.source
    single = load_image_splits(DataArguments(dataset_dir=str(tmp_path / "single"), validation_fraction=0.25))
    assert len(single.train) + len(single.validation) == len(splits.train) and single.test is None


def test_the_train_split_fingerprint_follows_its_files(tmp_path):
    make_image_folder(tmp_path / "data")
    args = DataArguments(dataset_dir=str(tmp_path / "data"), max_train_samples_per_class=2)
    first = load_image_splits(args).fingerprint
    assert first and load_image_splits(args).fingerprint == first
    assert load_image_splits(DataArguments(dataset_dir=str(tmp_path / "data"))).fingerprint == first  # before subsets
    Image.new("RGB", (10, 8), (7, 7, 7)).save(tmp_path / "data" / "dog" / "0.png")  # same name, other pixels
    assert load_image_splits(args).fingerprint != first
