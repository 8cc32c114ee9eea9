"""Top-1 accuracy of a classifier as an ``evaluate.Metric``, loadable offline by path.

    >>> import evaluate, hf_adaquant.metrics
    >>> top1 = evaluate.load(hf_adaquant.metrics.metric_path("top1_accuracy"))
    >>> top1.compute(predictions=[3, 1, 2], references=[3, 1, 0])
    {'accuracy': 0.6666666666666666, 'correct': 2, 'total': 3}

``predictions`` are arg-max class indices (``logits.argmax(-1)``). ``accuracy`` is a fraction, as the Hub's
``evaluate-metric/accuracy``; ``correct``/``total`` give the exact count (percentages are computed from them), and
no scikit-learn is needed.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Top-1 accuracy: the fraction of predicted class indices equal to the label (hf-adaquant)."

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class indices (int).
    references: true class indices (int).
Returns:
    {"accuracy": fraction in [0, 1], "correct": int, "total": int}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Top1Accuracy(evaluate.Metric):
    """Top-1 accuracy from class indices."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references):
        total = len(references)
        if total == 0:
            raise ValueError("no references to score")
        correct = int((np.asarray(predictions) == np.asarray(references)).sum())
        return {"accuracy": correct / total, "correct": correct, "total": total}
