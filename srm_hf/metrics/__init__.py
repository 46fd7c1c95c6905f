"""Metrics for image classification through `evaluate`, with accuracy shipped for offline use."""

import os

import evaluate
import numpy as np

from ..losses import IGNORE_INDEX

ACCURACY_PATH = os.path.join(os.path.dirname(__file__), "accuracy", "accuracy.py")


def load_metric(name: str):
    """`accuracy` from the shipped module (no network); any other name through `evaluate.load` (Hub)."""
    if name == "accuracy":
        return evaluate.load(ACCURACY_PATH)
    try:
        return evaluate.load(name)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise ValueError(f"The metric {name!r} cannot be loaded ({e}). 'accuracy' ships with srm_hf; other `evaluate` "
                         "metrics come from the Hub (or a local metric script's path): check the name, or go "
                         "online once to cache it.") from e


def make_compute_metrics(names: tuple[str, ...] = ("accuracy",)):
    """A `compute_metrics` for the Trainer: argmax of the logits against the labels, for every metric named, over the
    labelled images (those labelled IGNORE_INDEX, -100, are left out, as the losses leave them out). Under
    `batch_eval_metrics=True` it adds each batch (`compute_result=False`) and computes at the last one."""
    metrics = [load_metric(n) for n in names]

    def compute_metrics(eval_pred, compute_result: bool | None = None) -> dict[str, float]:
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        references, logits = as_numpy(eval_pred.label_ids), as_numpy(logits)  # tensors under batch_eval_metrics
        labelled = references != IGNORE_INDEX
        predictions = np.argmax(logits, axis=-1)[labelled]
        if compute_result is not None:  # batch_eval_metrics: one batch at a time
            for metric in metrics:
                metric.add_batch(predictions=predictions, references=references[labelled])
            if not compute_result:
                return {}
        results = {}
        for metric in metrics:
            results.update(metric.compute() if compute_result else metric.compute(predictions=predictions,
                                                                                  references=references[labelled]))
        return results

    return compute_metrics


def as_numpy(values) -> np.ndarray:
    """An evaluation output as a NumPy array (the Trainer passes tensors, on the device, under batch_eval_metrics)."""
    if not hasattr(values, "detach"):
        return np.asarray(values)
    values = values.detach().cpu()
    return (values.float() if values.is_floating_point() else values).numpy()  # NumPy has no bfloat16
