"""Accuracy of classifiers on in-memory tensors, computed by the ``top1_accuracy`` ``evaluate`` metric."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .metrics import load_metric
from .utils.logging import progress_bar

__all__ = ["evaluate_classifier", "top1_from_logits"]

_logger = logging.getLogger(__name__)


def top1_from_logits(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in percent.

    Args:
        logits: ``(N, C)`` scores.
        labels: ``(N,)`` integer class indices.

    Returns:
        Percentage of rows whose arg-max equals the label (0.0 for an empty batch).
    """
    if labels.numel() == 0:
        return 0.0
    correct = (logits.argmax(dim=-1) == labels.to(logits.device)).sum().item()
    return 100.0 * correct / labels.numel()


def evaluate_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 256,
    progress: bool = True,
) -> float:
    """Top-1 accuracy (percent) of ``model`` on ``(x, y)``, in eval mode without gradients.

    The model's training flag is restored afterwards. Batches are moved to the device of the
    model's first parameter (CPU for a parameter-free model).

    Args:
        model: Classifier returning ``(N, C)`` logits.
        x: Inputs, first dimension is the sample.
        y: Integer labels ``(N,)``.
        batch_size: Samples per forward pass.
        progress: Show a progress bar over batches (``HF_HUB_DISABLE_PROGRESS_BARS`` and
            ``hf_adaquant.utils.logging.disable_progress_bars()`` hide it).

    Returns:
        Accuracy in percent.

    Example:
        >>> acc = evaluate_classifier(model, x_test, y_test)
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    if x.shape[0] == 0:
        return 0.0
    metric = load_metric("top1_accuracy")
    try:
        with torch.no_grad():
            starts = range(0, x.shape[0], batch_size)
            for start in progress_bar(starts, desc="eval", disable=not progress, leave=False):
                xb = x[start : start + batch_size].to(device)
                metric.add_batch(predictions=model(xb).argmax(dim=-1).cpu(), references=y[start : start + batch_size])
    finally:
        model.train(was_training)
    acc = 100.0 * metric.compute()["correct"] / x.shape[0]  # from the count: the same float as always
    _logger.debug("top-1 %.2f%% on %d samples", acc, x.shape[0])
    return acc
