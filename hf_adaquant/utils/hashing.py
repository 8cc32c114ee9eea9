"""Tensor digests: one place for the byte layouts that checkpoints, work dirs and the sensitivity cache store.

Digests written to files must stay bit-identical across versions (a changed layout would reject every existing
checkpoint and work dir), so the two layouts in use are kept as they were written:

* *framed* (:func:`update_framed`): ``"{key}|{dtype}|{shape}|"`` then the raw bytes of every value. Checkpoint
  weights (SHA-256, keys sorted), work-dir layer files (SHA-256, keys sorted) and work-dir fingerprints of the model
  and calibration batches (BLAKE2b-128, in the order given) use it.
* *sampled* (:func:`update_sampled`): ``"{shape}{dtype}"`` then a strided sample of at most ``max_elements`` values;
  the sensitivity cache keys on it (cheap on large calibration sets).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping

import torch

__all__ = ["json_digest", "tensors_digest", "update_framed", "update_sampled"]


def update_framed(h: Any, key: str, t: torch.Tensor) -> None:
    """Feed ``key``, ``t``'s dtype and shape, then all its bytes, into the hash object ``h``."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def update_sampled(h: Any, t: torch.Tensor, max_elements: int | None) -> None:
    """Feed ``t``'s shape and dtype, then its bytes (every k-th value when it has more than ``max_elements``)."""
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    flat = t.reshape(-1)
    if max_elements is not None and flat.numel() > max_elements:
        flat = flat[:: -(-flat.numel() // max_elements)].contiguous()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())


def tensors_digest(items: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *,
                   algorithm: str = "sha256", digest_size: int | None = None, sort: bool = True) -> str:
    """Hex digest of named tensors in the framed layout.

    Args:
        items: a mapping or ``(key, tensor)`` pairs.
        algorithm: a :mod:`hashlib` name (``"sha256"``, ``"blake2b"``).
        digest_size: for BLAKE2 only (bytes).
        sort: sort by key first (a mapping's digest then does not depend on insertion order).
    """
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    if sort:
        pairs.sort(key=lambda kv: kv[0])
    h = hashlib.new(algorithm, digest_size=digest_size) if digest_size is not None else hashlib.new(algorithm)
    for key, t in pairs:
        update_framed(h, key, t)
    return h.hexdigest()


def json_digest(obj: Any, *, compact: bool = True) -> str:
    """SHA-256 of ``obj`` as sorted-key JSON (``compact``: no spaces, else ``json.dumps``'s default separators)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":")) if compact else json.dumps(obj, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
