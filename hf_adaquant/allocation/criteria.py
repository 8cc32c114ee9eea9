"""Sensitivity criteria: how far a model with one quantized layer is from the FP model on the calibration data.

* ``"kl"`` (default): KL(FP outputs || outputs) over the last dimension, as bias tuning uses;
* ``"mse"``: mean squared error of the outputs against the FP outputs;
* ``"task"``: ``loss_fn(outputs, labels)`` minus the FP model's loss (needs labels).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..tuning.bias import kl_divergence, output_tensors
from ..utils.batches import Batch, batch_size, call_model, slice_batch

__all__ = ["Criterion", "LossFn", "TASK_NEEDS_LABELS", "default_task_loss", "split_labels"]

TASK_NEEDS_LABELS = (
    "sensitivity_criterion='task' needs labels (and optionally a loss_fn; default cross-entropy on the first "
    "output): pass labels=... to measure_sensitivity, or use the label-free 'kl' or 'mse' criterion. quantize() "
    "takes no labels: measure with measure_sensitivity(..., labels=..., loss_fn=...), solve with allocate_bits and "
    "pass allocation_to_layer_bits(allocation) as config.layer_bits")

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def default_task_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the first floating output tensor (the logits) against integer labels."""
    tensors = output_tensors(outputs)
    if not tensors:
        raise ValueError("the model output holds no floating tensor to compute a task loss on")
    return F.cross_entropy(tensors[0], labels.to(tensors[0].device))


def split_labels(labels: Any, batches: Sequence[Batch]) -> list[Any]:
    """Labels per batch: a sequence with one entry per batch (extra entries ignored) or one tensor split by size."""
    if isinstance(labels, torch.Tensor):
        sizes = [batch_size(b) for b in batches]
        if labels.shape[0] < sum(sizes):
            raise ValueError(f"labels has {labels.shape[0]} entries but the calibration data has {sum(sizes)} samples")
        return list(torch.split(labels[: sum(sizes)], sizes))
    labels = list(labels)
    if len(labels) < len(batches):
        raise ValueError(f"labels has {len(labels)} batches but the calibration data has {len(batches)}")
    return labels[: len(batches)]


class Criterion:
    """Criterion of a model on the calibration batches, relative to the FP model (FP value subtracted)."""

    def __init__(self, kind: str, fp_model: nn.Module, batches: Sequence[Batch], labels: Any,
                 loss_fn: LossFn | None, max_samples: int | None = None) -> None:
        self.kind = kind
        per_batch_labels = split_labels(labels, batches) if labels is not None else None
        self.batches, self.weights = [], []
        for i, batch in enumerate(batches):  # the first max_samples samples
            n = batch_size(batch)
            if max_samples is not None:
                n = min(n, max_samples - sum(self.weights))
                if n <= 0:
                    break
                if n < batch_size(batch):
                    batch = slice_batch(batch, 0, n)
                    if per_batch_labels is not None:
                        per_batch_labels[i] = per_batch_labels[i][:n]
            self.batches.append(batch)
            self.weights.append(n)
        batches = self.batches
        self.labels = None
        self.loss_fn = loss_fn or default_task_loss
        if kind == "task":
            if labels is None:
                raise ValueError(TASK_NEEDS_LABELS)
            self.labels = per_batch_labels[: len(batches)]
            self.targets: list[list[torch.Tensor]] = []
        else:
            with torch.no_grad():
                self.targets = [[t.detach() for t in output_tensors(call_model(fp_model, b, i))]
                                for i, b in enumerate(batches)]
            if not all(self.targets):
                raise ValueError("the model output holds no floating tensor to compare with the FP model")
        self.baseline = 0.0  # the FP model matches its own outputs exactly
        if kind == "task":
            self.baseline = self(fp_model)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        total = 0.0
        for i, (batch, weight) in enumerate(zip(self.batches, self.weights)):
            out = call_model(model, batch, i)
            if self.kind == "task":
                value = self.loss_fn(out, self.labels[i])
            elif self.kind == "kl":
                value = kl_divergence(output_tensors(out), self.targets[i])
            else:
                value = sum(F.mse_loss(q.float(), p.float()) for q, p in zip(output_tensors(out), self.targets[i]))
            total += float(value) * weight
        return total / sum(self.weights) - self.baseline
