"""Explicit random generators: results depend on the seed passed in, not on hidden global state."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["make_generator", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (for code we do not control, e.g. dropout in a user model)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def make_generator(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a salt (e.g. the layer index), so layers do not share streams."""
    value = seed
    for s in salt:
        value = value * 1_000_003 + s
    return torch.Generator().manual_seed(value % (2**63))
