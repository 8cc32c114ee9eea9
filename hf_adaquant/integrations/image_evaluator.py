"""Top-1 accuracy of transformers image classifiers through ``evaluate.evaluator("image-classification")``.

evaluate's evaluator builds a transformers ``pipeline("image-classification")`` around the model, runs it over a
``datasets.Dataset`` of images and scores the predicted labels with a metric (ours: ``top1_accuracy``, offline).
It fits where :func:`supports_image_evaluator` says so:

- a transformers ``PreTrainedModel``: evaluate 0.4.6 must build the pipeline itself. Handing it a ready
  ``Pipeline`` or a plain callable raises ``AttributeError`` on transformers 5, because its type check reads
  ``transformers.TFPreTrainedModel``, which 5.x removed. So timm and plain PyTorch models keep our loops;
- unique ``id2label`` names: the pipeline returns label *names* and ``label_mapping`` turns them back into
  indices, which duplicate names (ImageNet-1k's two "crane" classes, 134 and 517) would make ambiguous;
- the model's own image processor as preprocessing: the pipeline always applies it.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import evaluate
import torch
import transformers
from torch import nn

from ..metrics import load_metric

__all__ = ["evaluate_image_classifier", "image_label_mapping", "supports_image_evaluator"]

_logger = logging.getLogger(__name__)


def image_label_mapping(model: nn.Module) -> dict[str, int] | None:
    """``{label name: class index}`` from ``model.config.id2label``, or None where names repeat or are missing."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    mapping = {str(name): int(index) for index, name in id2label.items()}
    return mapping if id2label and len(mapping) == len(id2label) else None


def supports_image_evaluator(model: nn.Module) -> bool:
    """Whether :func:`evaluate_image_classifier` can score ``model`` (see the module docstring)."""
    return isinstance(model, transformers.PreTrainedModel) and image_label_mapping(model) is not None


def evaluate_image_classifier(model: nn.Module, data: datasets.Dataset, image_processor: Any, *,
                              input_column: str = "image", label_column: str = "label",
                              batch_size: int = 32) -> dict[str, Any]:
    """Top-1 accuracy of a transformers image classifier on ``data`` via ``evaluate.evaluator``.

    Args:
        model: a transformers image-classification model (original or quantized); its device is used.
        data: rows with a PIL image (``input_column``) and a class index (``label_column``).
        image_processor: the model's ``AutoImageProcessor`` (the pipeline's preprocessing).
        batch_size: images per pipeline forward pass.

    Returns:
        ``{"accuracy": fraction, "correct": int, "total": int}`` from our ``top1_accuracy`` metric, plus evaluate's
        timing keys (``total_time_in_seconds``, ``samples_per_second``, ``latency_in_seconds``).

    Raises:
        ValueError: a model :func:`supports_image_evaluator` rejects.

    Example:
        >>> evaluate_image_classifier(vit, datasets.Dataset.from_dict({"image": images, "label": labels}), processor)
    """
    mapping = image_label_mapping(model)
    if not isinstance(model, transformers.PreTrainedModel) or mapping is None:
        raise ValueError("evaluate's image-classification evaluator needs a transformers model with unique "
                         "id2label names; use hf_adaquant.evaluation.evaluate_classifier")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    task_evaluator = evaluate.evaluator("image-classification")
    task_evaluator.PIPELINE_KWARGS = {"batch_size": batch_size}  # the class default runs one image at a time
    was_training = model.training
    try:
        result = task_evaluator.compute(
            model_or_pipeline=model, data=data, metric=load_metric("top1_accuracy"), feature_extractor=image_processor,
            input_column=input_column, label_column=label_column, label_mapping=mapping, device=device)
    finally:
        model.train(was_training)
    _logger.debug("evaluate.evaluator top-1 %.4f on %d images", result["accuracy"], result["total"])
    return dict(result)
