"""Calibration batches: validation, device moves and calling a model on one batch.

A batch is a tensor, a tuple/list of tensors (positional inputs) or a dict of tensors (keyword inputs, as
transformers models take).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["Batch", "batch_size", "call_model", "materialize_batches", "slice_batch", "split_batches", "to_device"]

Batch = Any


def _tensors(batch: Batch) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    raise TypeError(f"a calibration batch must be a tensor, a tuple/list or a dict of tensors, got {type(batch)!r}")


def batch_size(batch: Batch) -> int:
    """Number of samples in ``batch`` (first dimension of its first tensor)."""
    tensors = _tensors(batch)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return type(batch)(v.to(device) if isinstance(v, torch.Tensor) else v for v in batch)


def materialize_batches(data: Iterable[Batch], max_samples: int | None = None) -> list[Batch]:
    """Read the calibration iterable once into a list of CPU batches, checking it is usable.

    Raises:
        ValueError: the data is empty, or a floating tensor holds NaN/Inf (naming the batch and key).
    """
    if isinstance(data, (torch.Tensor, Mapping)):
        raise TypeError("calibration_data must be an iterable of batches (e.g. a list or a DataLoader), "
                        "not a single tensor/dict: wrap it in a list")
    batches: list[Batch] = []
    seen = 0
    for i, batch in enumerate(data):
        if isinstance(batch, Mapping) and not isinstance(batch, dict):
            batch = dict(batch)  # e.g. transformers BatchEncoding
        tensors = _tensors(batch)
        if not tensors:
            raise ValueError(f"calibration batch {i} holds no tensor")
        keys = list(batch.keys()) if isinstance(batch, dict) else list(range(len(tensors)))
        for key, t in zip(keys, tensors):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"calibration batch {i} (input {key!r}) contains NaN or Inf values")
        batches.append(to_device(batch, "cpu"))
        seen += batch_size(batch)
        if max_samples is not None and seen >= max_samples:
            break
    if not batches:
        raise ValueError("calibration_data is empty: AdaQuant needs at least one batch of unlabeled inputs")
    return batches


def call_model(model: nn.Module, batch: Batch) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)`` by the batch's type, on the model's device."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type != "cpu":
        batch = to_device(batch, param.device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``start:stop`` of a tensor, dict or tuple batch (0-d entries are kept as they are)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
    return type(batch)(v[start:stop] if isinstance(v, torch.Tensor) and v.dim() else v for v in batch)


def split_batches(batches: list[Batch], max_size: int) -> list[Batch]:
    """Split batches larger than ``max_size`` samples (bounds activation memory when backpropagating)."""
    out: list[Batch] = []
    for batch in batches:
        n = batch_size(batch)
        out.extend(slice_batch(batch, i, min(i + max_size, n)) for i in range(0, n, max_size))
    return out
