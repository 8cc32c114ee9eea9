"""Calibration batches: validation, device moves and calling a model on one batch.

A batch is a tensor, a tuple/list of tensors (positional inputs) or a dict of tensors (keyword inputs, as
transformers models take).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

__all__ = ["Batch", "CalibrationBatchError", "batch_size", "call_model", "check_batch_structure",
           "materialize_batches", "slice_batch", "split_batches", "to_device"]

Batch = Any


class CalibrationBatchError(ValueError):
    """The model failed on one calibration batch: ``batch_index`` names it, the model's own error is the cause."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"the model failed on calibration batch {index}: {type(error).__name__}: {error}")
        self.batch_index = index


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
        ValueError: the data is empty, a floating tensor holds NaN/Inf, or a batch's structure differs from the
            first one's (:func:`check_batch_structure`); the message names the batch and the input.
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
        if batches:
            check_batch_structure(batches[0], batch, i)
        batches.append(to_device(batch, "cpu"))
        seen += batch_size(batch)
        if max_samples is not None and seen >= max_samples:
            break
    if not batches:
        raise ValueError("calibration_data is empty: AdaQuant needs at least one batch of unlabeled inputs")
    return batches


def _entries(batch: Batch) -> tuple[str, dict[Any, Any]]:
    """``(kind, {key: value})`` of a batch: its container type and its inputs by name or position."""
    if isinstance(batch, torch.Tensor):
        return "a tensor", {0: batch}
    if isinstance(batch, Mapping):
        return "a dict", dict(batch)
    return f"a tuple/list of {len(batch)} inputs", dict(enumerate(batch))  # both are called as model(*batch)


def _entry_difference(first: Any, other: Any) -> str | None:
    """How input ``other`` differs from the same input of batch 0, or None."""
    if not isinstance(first, torch.Tensor) or not isinstance(other, torch.Tensor):
        same = type(first) is type(other)
        return None if same else f"is a {type(other).__name__}, but in batch 0 a {type(first).__name__}"
    if first.dtype != other.dtype:
        return f"has dtype {other.dtype}, but batch 0 has {first.dtype}"
    if first.dim() != other.dim():
        return f"has shape {tuple(other.shape)}, but batch 0 has {tuple(first.shape)} (another number of dimensions)"
    # Image-like inputs (N x C x H x W and up): the channels are fixed by the model's first layer. Other
    # non-batch sizes may legitimately differ (text sequence lengths, image resolutions for pooled models);
    # a model that rejects them fails with the batch index (call_model's ``index``).
    if first.is_floating_point() and first.dim() >= 4 and first.shape[1] != other.shape[1]:
        return f"has shape {tuple(other.shape)}, but batch 0 has {tuple(first.shape)} (another number of channels)"
    return None


def check_batch_structure(first: Batch, batch: Batch, index: int) -> None:
    """Check that calibration batch ``index`` has the structure of batch 0, before any model runs.

    Same container (tensor, tuple/list of the same length, dict with the same keys), and per input the same
    type, dtype and number of dimensions (and channels for image-like inputs); batch and sequence lengths may
    differ.

    Raises:
        ValueError: naming the batch index, the input and what differs.
    """
    kind0, entries0 = _entries(first)
    kind, entries = _entries(batch)
    if kind != kind0 or entries.keys() != entries0.keys():
        if isinstance(first, Mapping) and isinstance(batch, Mapping):
            kind0, kind = (f"a dict with keys {sorted(map(str, e))}" for e in (entries0, entries))
        raise ValueError(f"calibration batch {index} is {kind}, but batch 0 is {kind0}: every batch must hold "
                         "the same inputs")
    for key, value in entries.items():
        difference = _entry_difference(entries0[key], value)
        if difference is not None:
            raise ValueError(f"calibration batch {index}, input {key!r}: {difference}; every batch must hold the "
                             "same kind of inputs")


def call_model(model: nn.Module, batch: Batch, index: int | None = None, *,
               passthrough: tuple[type[BaseException], ...] = ()) -> Any:
    """``model(batch)``, ``model(*batch)`` or ``model(**batch)`` by the batch's type, on the model's device.

    With ``index`` (the calibration batch's position in the user's data), an error of the model is re-raised as
    :class:`CalibrationBatchError` naming that batch, the original as ``__cause__``: otherwise a bad batch among
    hundreds gives the model's bare shape error. Exceptions of the ``passthrough`` types (a hook's control flow
    or its own error that names the batch) are re-raised as they are; out-of-memory and OS errors (disk full
    while spilling a cache) are not the batch's fault and keep their type, with the batch added as a note.
    """
    if index is None:
        return _call(model, batch)
    try:
        return _call(model, batch)
    except (CalibrationBatchError, *passthrough):
        raise
    except (MemoryError, torch.cuda.OutOfMemoryError, OSError) as exc:  # not the batch's fault: keep the type
        exc.add_note(f"while running calibration batch {index}")
        raise
    except Exception as exc:
        raise CalibrationBatchError(index, exc) from exc


def _call(model: nn.Module, batch: Batch) -> Any:
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
