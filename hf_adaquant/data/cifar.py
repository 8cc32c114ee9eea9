"""CIFAR-10 arrays stored as ``.npz`` (``x`` uint8 NHWC, ``y`` int64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..models.cifar_resnet import CIFAR_MEAN, CIFAR_STD

__all__ = ["load_cifar10_npz", "normalize_cifar"]


def normalize_cifar(x_uint8: np.ndarray | Tensor) -> Tensor:
    """Turn uint8 ``(N, 32, 32, 3)`` images into normalised float ``(N, 3, 32, 32)`` tensors.

    Args:
        x_uint8: Images, channels last, values 0..255.

    Returns:
        Float32 tensor scaled to [0, 1] and normalised with ``CIFAR_MEAN`` / ``CIFAR_STD``.
    """
    x = torch.as_tensor(np.asarray(x_uint8)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def load_cifar10_npz(path: str | Path, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Load a CIFAR-10 ``.npz`` file as model-ready tensors.

    Args:
        path: File with arrays ``x`` (uint8, N x 32 x 32 x 3) and ``y`` (integer labels).
        limit: Keep only the first ``limit`` images (original order).

    Returns:
        ``(x, y)``: float32 ``(N, 3, 32, 32)`` normalised for the CIFAR ResNets, int64 ``(N,)``.

    Example:
        >>> x, y = load_cifar10_npz("../shared/data/cifar10/test.npz", limit=1000)
    """
    with np.load(Path(path)) as data:
        x, y = data["x"], data["y"]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return normalize_cifar(x), torch.as_tensor(np.asarray(y), dtype=torch.long)
