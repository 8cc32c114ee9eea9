"""Activation storage for calibration: an in-memory byte budget shared by every store, spilling to disk past it.

* :class:`CacheBudget` counts the bytes that stores hold in memory (``max_cache_bytes``); a chunk that does not
  fit goes to disk instead.
* :class:`SpillDir` is the ONE temporary directory of a run's spilled chunks. It is created on the first spill and
  removed by :meth:`SpillDir.close` (the runners call it in ``finally``: success, failure and Ctrl-C). A full disk
  raises :class:`SpillError` naming the directory and the size needed, rather than a bare ``OSError``.
* :class:`Holdings` is what one store holds: bytes counted in the budget and the spill files it wrote, given back
  together by :meth:`Holdings.release` (the layer caches' stores and :class:`TreeStore` alike).
* :class:`TreeStore` keeps one nested structure of tensors per calibration batch (a stage boundary: a block's
  positional and keyword inputs, or its output), exactly: dtypes are kept, nothing is rounded.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

__all__ = ["CacheBudget", "Holdings", "SpillDir", "SpillError", "TreeStore", "load_chunk", "save_chunk"]

_MiB = float(1 << 20)


class SpillError(OSError):
    """Spilling activations to disk failed (disk full); the message names the directory and the size needed."""


class CacheBudget:
    """Bytes of cached activations held in memory, shared by several stores, at most ``max_bytes`` at a time."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.used = 0
        self.peak = 0  # highest ``used`` seen (tests and diagnostics)

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` as held in memory if they fit the budget; False: the caller spills them."""
        if self.used + nbytes > self.max_bytes:
            return False
        self.used += nbytes
        self.peak = max(self.peak, self.used)
        return True

    def release(self, nbytes: int) -> None:
        self.used = max(0, self.used - nbytes)


def _numpy(t: torch.Tensor) -> np.ndarray:
    # numpy has no bfloat16: such chunks are written as their int16 bit pattern and viewed back on load.
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def save_chunk(path: str, t: torch.Tensor, what: str, spill: "SpillDir | None" = None) -> None:
    """Write CPU tensor ``t`` to ``path`` (.npy); a full disk raises :class:`SpillError` naming the folder and size."""
    try:
        np.save(path, _numpy(t))
    except OSError as e:
        if os.path.exists(path):
            os.remove(path)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        nbytes = t.numel() * t.element_size()
        so_far = f"; {spill.bytes_written / _MiB:.1f} MiB already spilled there" if spill is not None else ""
        raise SpillError(e.errno, f"no space left on the disk of {os.path.dirname(path)!r} while spilling the {what}: "
                         f"this chunk needs {nbytes / _MiB:.1f} MiB ({nbytes} bytes){so_far}. Free space there, "
                         "point TMPDIR to a larger disk, or raise max_cache_bytes to keep more in memory") from e
    if spill is not None:
        spill.bytes_written += t.numel() * t.element_size()


def load_chunk(path: str, dtype: torch.dtype) -> torch.Tensor:
    """The chunk at ``path`` as a tensor of ``dtype`` (read into memory: the file may be removed afterwards)."""
    t = torch.from_numpy(np.load(path))
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


@dataclass(frozen=True)
class _Spilled:
    path: str
    dtype: torch.dtype
    channels_last: bool  # restored on load: the layout can change which kernel (and rounding) a conv uses


class SpillDir:
    """The one temporary directory of a run's spilled chunks, made on first use; :meth:`close` removes it."""

    def __init__(self, prefix: str = "hf_adaquant_cache_") -> None:
        self.prefix = prefix
        self.path: str | None = None
        self.bytes_written = 0
        self._count = 0

    def new_path(self, stem: str = "chunk") -> str:
        if self.path is None:
            self.path = tempfile.mkdtemp(prefix=self.prefix)
        self._count += 1
        return os.path.join(self.path, f"{stem}{self._count}.npy")

    def close(self) -> None:
        """Remove the directory and everything in it (idempotent)."""
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def __enter__(self) -> "SpillDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Holdings:
    """What one store holds for a run: ``in_memory`` bytes counted in ``budget`` (if any) and the files it spilled.

    The store adds to ``in_memory`` what it keeps in memory; :meth:`spill` writes a chunk and records its file;
    :meth:`release` gives the bytes back to the budget and removes the files (a directory stays: it is the run's
    :class:`SpillDir`, or the store's own).
    """

    def __init__(self, budget: CacheBudget | None = None) -> None:
        self.budget = budget
        self.in_memory = 0
        self.files: list[str] = []

    def spill(self, path: str, t: torch.Tensor, what: str, spill: SpillDir | None) -> None:
        """Write CPU tensor ``t`` to ``path`` with :func:`save_chunk` (``spill``: the directory's byte count and
        its message) and record the file for :meth:`release`."""
        save_chunk(path, t, what, spill)
        self.files.append(path)

    def release(self) -> None:
        """Return the in-memory bytes to the budget and remove the spilled files (idempotent)."""
        if self.budget is not None:
            self.budget.release(self.in_memory)
        self.in_memory = 0
        for path in self.files:
            if os.path.exists(path):
                os.remove(path)
        self.files = []


class TreeStore:
    """One nested structure (tuples, lists, dicts of tensors and plain values) per batch, stored exactly.

    Tensors go to CPU memory while ``budget`` allows, otherwise to a file under ``spill``; :meth:`get` rebuilds the
    structure with every tensor on ``device``. Non-tensor leaves (None, flags) are kept as they are.
    """

    def __init__(self, budget: CacheBudget, spill: SpillDir, what: str) -> None:
        self.budget, self.spill, self.what = budget, spill, what
        self._items: dict[int, tuple[list[Any], Any]] = {}
        self._held = Holdings(budget)

    def put(self, index: int, tree: Any) -> None:
        leaves, spec = pytree.tree_flatten(tree)
        stored = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                nbytes = leaf.numel() * leaf.element_size()
                if self.budget.reserve(nbytes):
                    self._held.in_memory += nbytes
                    stored.append(leaf.detach().to("cpu", copy=True))  # a copy: the caller may reuse its tensor
                else:
                    t = leaf.detach().to("cpu")
                    channels_last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(
                        memory_format=torch.channels_last)
                    path = self.spill.new_path("boundary")
                    self._held.spill(path, t.contiguous(), f"{self.what} (batch {index})", self.spill)
                    stored.append(_Spilled(path, t.dtype, channels_last))
            else:
                stored.append(leaf)
        self._items[index] = (stored, spec)

    def get(self, index: int, device: torch.device | None = None) -> Any:
        stored, spec = self._items[index]
        leaves = []
        for leaf in stored:
            if isinstance(leaf, _Spilled):
                spilled = leaf
                leaf = load_chunk(spilled.path, spilled.dtype)
                if spilled.channels_last:
                    leaf = leaf.contiguous(memory_format=torch.channels_last)
            elif isinstance(leaf, torch.Tensor) and (device is None or leaf.device == device):
                leaf = leaf.clone()  # a stage may modify its inputs in place (inplace ReLU): keep ours intact
            if isinstance(leaf, torch.Tensor) and device is not None and leaf.device != device:
                leaf = leaf.to(device)
            leaves.append(leaf)
        return pytree.tree_unflatten(leaves, spec)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Free the memory and files of this store (the spill directory itself stays for the run)."""
        self._items.clear()
        self._held.release()
