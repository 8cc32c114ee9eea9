"""Our metrics as ``evaluate.Metric`` modules shipped inside the package: ``evaluate.load`` them by path, offline.

    >>> from hf_adaquant.metrics import load_metric
    >>> load_metric("squad").compute(predictions=..., references=...)   # {"exact_match", "f1"} in percent
    >>> load_metric("top1_accuracy").compute(predictions=..., references=...)   # {"accuracy", "correct", "total"}
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import evaluate

__all__ = ["METRICS", "load_metric", "metric_path"]

METRICS = ("squad", "top1_accuracy")


def metric_path(name: str) -> str:
    """The folder of a shipped metric (what ``evaluate.load`` takes).

    Raises:
        ValueError: an unknown name.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; shipped: {list(METRICS)}")
    return str(files(__name__) / name)


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load(metric_path(name), keep_in_memory=True, **kwargs)``: no network, no cache files for the
    predictions."""
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)
