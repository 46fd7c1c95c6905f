"""Top-1 accuracy as an `evaluate` module, shipped with srm_hf so that it loads offline.

    evaluate.load(srm_hf.metrics.ACCURACY_PATH).compute(predictions=[0, 1], references=[0, 0])  # {"accuracy": 0.5}
"""

import datasets
import evaluate
import numpy as np


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to their reference label.",
            citation="",
            inputs_description="predictions: predicted class ids; references: true class ids; "
            "normalize (default True): return a fraction instead of a count.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True):
        correct = np.asarray(predictions) == np.asarray(references)
        return {"accuracy": float(correct.mean() if normalize else correct.sum())}
