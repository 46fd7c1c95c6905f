import numpy as np
from transformers import EvalPrediction

from srm_hf.metrics import load_metric, make_compute_metrics
from srm_hf.plots import loss_curves, save_report


def test_shipped_accuracy_loads_offline():
    assert load_metric("accuracy").compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2]) == {"accuracy": 0.75}


def test_compute_metrics_takes_the_argmax():
    compute = make_compute_metrics()
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert compute(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 1]))) == {"accuracy": 2 / 3}
    # -100 (cross-entropy's ignore index): that image is left out, as the losses leave it out
    assert compute(EvalPrediction(predictions=logits, label_ids=np.array([0, -100, 1]))) == {"accuracy": 1 / 2}


def test_report_png(tmp_path):
    history = [{"dictionary/mse": 1.0 - 0.1 * i, "loss": 1.0, "step": i} for i in range(1, 5)]
    history += [{"srm/pixel": 3.0, "srm/image": 0.5, "step": i} for i in range(5, 8)]
    history += [{"eval_loss": 0.3, "step": 7}]
    curves = loss_curves(history)
    assert set(curves) == {"dictionary/mse", "srm/pixel", "srm/image"}
    assert curves["srm/pixel"] == ([5, 6, 7], [3.0, 3.0, 3.0])
    usage = {"layer1": np.array([0.5, 0.25, 0.0, 0.0]), "global_pool": np.array([1.0, 0.0])}
    path = save_report(str(tmp_path / "report.png"), history, usage, title="test")
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
