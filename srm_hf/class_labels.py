"""The `label` column of every split as one `ClassLabel`: class names, indices shared by all splits, range checks.

    splits, names = as_class_labels({"train": train, "test": test})   # each split: columns "image" and "label"
    check_labels(splits["test"], len(names), "test")

Splits that carry a `ClassLabel` each (image folders loaded per split number their own classes) are mapped by class
name onto train's; other label columns (ints, strings) become classes in sorted order over all splits.
"""

import numpy as np
from datasets import ClassLabel, Dataset, Value


def as_class_labels(splits: dict[str, Dataset]) -> tuple[dict[str, Dataset], list[str]]:
    """Every split's `label` cast to one `ClassLabel`, and its names. Labels must be one scalar per image."""
    for split, ds in splits.items():
        feature = ds.features["label"]
        if not isinstance(feature, (ClassLabel, Value)):
            raise ValueError(f"The label column of split {split!r} holds {feature!r}, not one class label per image "
                             "(a list is multi-label, which the losses do not take; an image or a mapping is another "
                             "kind of column). Name the column of class labels with --label_column (and the images "
                             "with --image_column).")
    if isinstance(splits["train"].features["label"], ClassLabel):
        return _by_class_name(splits)
    values = set().union(*(set(ds.unique("label")) for ds in splits.values()))
    if None in values:
        raise ValueError("Column 'label' holds missing (null) labels, which are not a class. Drop those rows "
                         "(e.g. `dataset.filter(lambda x: x['label'] is not None)`) first.")
    values = sorted(values, key=lambda v: (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v)))
    names = [str(v) for v in values]
    negative = [v for v in values if isinstance(v, (int, float)) and v < 0]
    if negative:
        raise ValueError(f"Column 'label' holds negative labels {negative} (often: unlabelled rows), which are not "
                         "classes. Drop those rows (e.g. `dataset.filter(lambda x: x['label'] >= 0)`) first.")
    target = ClassLabel(names=names)
    if all(isinstance(v, int) for v in values) and values == list(range(len(values))):
        return {k: ds.cast_column("label", target) for k, ds in splits.items()}, names
    mapping = {v: i for i, v in enumerate(values)}
    out = {}
    for k, ds in splits.items():
        ds = ds.map(lambda b: {"label": [mapping[v] for v in b["label"]]}, batched=True)
        out[k] = ds.cast_column("label", target)
    return out, names


def _by_class_name(splits: dict[str, Dataset]) -> tuple[dict[str, Dataset], list[str]]:
    """Train's `ClassLabel` names, then those only other splits have; each split's indices mapped by name onto them
    (a split whose labels are plain ints is taken in train's indexing). Negative labels (unlabelled rows) stay."""
    names = list(splits["train"].features["label"].names)
    for ds in splits.values():
        feature = ds.features["label"]
        names += [n for n in getattr(feature, "names", []) if n not in names]
    target, out = ClassLabel(names=names), {}
    for k, ds in splits.items():
        own = getattr(ds.features["label"], "names", None)
        if own is None or list(own) == names:
            out[k] = ds
            continue
        ds = ds.cast_column("label", Value("int64"))
        if list(own) != names[:len(own)]:
            index = [names.index(n) for n in own]
            ds = ds.map(lambda b: {"label": [index[v] if v >= 0 else v for v in b["label"]]}, batched=True)
        out[k] = ds.cast_column("label", target)
    return out, names


def labels_of(ds: Dataset) -> np.ndarray:
    """The `label` column as an array, read through Arrow (no per-value formatting)."""
    return ds.with_format("arrow")["label"].to_numpy()


def check_labels(ds: Dataset, num_labels: int, split: str) -> None:
    """Every label must index a class: 0 <= label < num_labels."""
    labels = labels_of(ds)
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if split == "test" and len(labels) and (labels < 0).all():  # a Hub test split without labels (-1)
        raise ValueError(f"Split 'test' has no labels (all {len(labels)} are negative, e.g. {labels[0]}): evaluate on "
                         "another split with --test_split NAME, or on none with --test_split none.")
    if bad.size:
        raise ValueError(f"Split {split!r} column 'label' has {bad.size} labels outside [0, {num_labels}) (e.g. row "
                         f"{bad[0]}: {labels[bad[0]]}). Fix the labels or the number of classes.")
