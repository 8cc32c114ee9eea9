"""A layer's calibration cache: its inputs and FP outputs, in fp16, spilling to disk past a memory limit.

The reference implementation caches every layer's activations at once (~81 GiB for ResNet-50 on 1000 images).
Here only the layer being optimised is held (captured by :mod:`hf_adaquant.adaquant.capture`).

The cache never stores a value it cannot represent: a stream whose values exceed the fp16 range is kept in
float32 from then on (an overflow to ``inf`` would silently give a NaN model), and a captured tensor holding
NaN/inf is refused with an error naming the layer and the batch.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import AdaQuantConfig
from .spill import CacheBudget, Holdings, SpillDir

__all__ = ["IOCache", "NonFiniteActivationError", "cache_dtype"]

# The logger of the module this code came from (cache.py): log filters and level settings keep working.
_logger = logging.getLogger(f"{__package__}.cache")


def cache_dtype(config: AdaQuantConfig) -> torch.dtype:
    """The dtype layer caches are stored in (``config.cache_dtype``: float16, else float32)."""
    return torch.float16 if config.cache_dtype == "float16" else torch.float32


class NonFiniteActivationError(ValueError):
    """A captured layer input or output holds NaN or inf (the message names the layer and the batch)."""


@dataclass(frozen=True)
class _OnDisk:
    """A spilled chunk: its file and shape. It is mapped only while rows are read from it: pages of a
    mapping that stays open count in the process's resident set once touched, and sampling mini-batches over
    200 steps touches most of them (up to the whole spilled cache, 2 GB for a resnet50 ``layer1`` conv)."""

    path: str
    shape: tuple[int, ...]

    def __len__(self) -> int:
        return self.shape[0]


@dataclass
class _Store:
    """Chunks of one tensor stream; each chunk in memory or on disk (mapped only while rows are read).

    ``what`` names the stream in messages (e.g. "inputs of layer 'conv1'"). ``on_widen`` is called when the stream
    switches from its low-precision ``dtype`` to float32 because a value does not fit it. With a shared ``budget``
    and ``spill`` directory (the runners'), memory is counted against the run's budget and chunks past it go to
    the run's one spill directory; alone, the store keeps ``max_bytes`` in memory and makes its own directory.
    """

    dtype: torch.dtype
    max_bytes: int
    what: str = "activations"
    on_widen: Callable[[float], None] | None = None
    spill_dir: str | None = None  # own directory (no shared ``spill``)
    chunks: list[torch.Tensor | _OnDisk] = field(default_factory=list)
    budget: CacheBudget | None = None
    spill: SpillDir | None = None
    held: Holdings = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.held = Holdings(self.budget)  # bytes in memory and spilled files, given back by cleanup()

    def _check(self, t: torch.Tensor) -> None:
        """Refuse NaN/inf; widen the stream to float32 when ``t`` would overflow its dtype."""
        if t.numel() == 0 or not t.is_floating_point():
            return
        lo, hi = (float(v) for v in t.detach().aminmax())  # no |t| copy of a large activation; NaN propagates
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise NonFiniteActivationError(f"the {self.what} contain NaN or inf values")
        peak = max(-lo, hi)
        if self.dtype.is_floating_point and peak > torch.finfo(self.dtype).max:
            # Earlier chunks fitted the narrow dtype and stay as they are; reads return float32 anyway.
            self.dtype = torch.float32
            if self.on_widen is not None:
                self.on_widen(peak)

    def _fits(self, nbytes: int) -> bool:
        if self.budget is not None:
            return self.budget.reserve(nbytes)
        return self.held.in_memory + nbytes <= self.max_bytes

    def append(self, t: torch.Tensor) -> None:
        self._check(t)
        t = t.detach().to("cpu", self.dtype).contiguous()
        nbytes = t.numel() * t.element_size()
        if self._fits(nbytes):
            self.chunks.append(t)
            self.held.in_memory += nbytes
            return
        if self.spill is not None:
            path = self.spill.new_path()
        else:
            if self.spill_dir is None:
                self.spill_dir = tempfile.mkdtemp(prefix="hf_adaquant_cache_")
            path = os.path.join(self.spill_dir, f"chunk{len(self.chunks)}.npy")
        self.held.spill(path, t, self.what, self.spill)
        self.chunks.append(_OnDisk(path, tuple(t.shape)))

    @staticmethod
    def take_into(chunk: torch.Tensor | _OnDisk, idx: torch.Tensor, out: torch.Tensor) -> None:
        """Write rows ``idx`` (sorted) of ``chunk`` into the float32 tensor ``out``, converting on the way: no
        low-precision copy of the rows, and a run of consecutive rows is read as a view."""
        start, stop = int(idx[0]), int(idx[-1]) + 1
        rows = slice(start, stop) if stop - start == len(idx) else idx
        if isinstance(chunk, torch.Tensor):
            if isinstance(rows, slice):
                out.copy_(chunk[rows])
            elif chunk.dtype == out.dtype:
                torch.index_select(chunk, 0, idx, out=out)
            else:  # a low-precision temporary of the rows (half the float32 size), then the conversion
                out.copy_(chunk.index_select(0, idx))
            return
        mapped = np.load(chunk.path, mmap_mode="r")  # unmapped when it goes out of scope (see _OnDisk)
        out.numpy()[...] = mapped[rows if isinstance(rows, slice) else rows.numpy()]

    def cleanup(self) -> None:
        self.chunks = []
        self.held.release()
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None


class IOCache:
    """Paired layer inputs ``x`` and FP targets ``y``, sampled together in mini-batches."""

    def __init__(self, dtype: torch.dtype = torch.float16, max_bytes: int = 4 << 30, name: str = "", *,
                 budget: CacheBudget | None = None, spill: SpillDir | None = None) -> None:
        self.name = name
        self.requested_dtype = dtype
        self._widened = False
        self.x = _Store(dtype, max_bytes // 2, f"inputs of layer {name!r}", self._note_widened, budget=budget,
                        spill=spill)
        self.y = _Store(dtype, max_bytes // 2, f"outputs of layer {name!r}", self._note_widened, budget=budget,
                        spill=spill)

    def _note_widened(self, peak: float) -> None:
        if not self._widened:  # once per layer, whichever stream overflowed first
            self._widened = True
            _logger.info("layer %r: activations up to %.3g do not fit the %s cache: caching them in float32",
                         self.name, peak, str(self.requested_dtype).replace("torch.", ""))

    def finalize(self) -> "IOCache":
        """Check that inputs and targets pair up and index the batches by shape group.

        Samples are drawn by global index within a group of equal-shape batches, so the mini-batches do not
        depend on which batches were spilled to disk.
        """
        if [len(c) for c in self.x.chunks] != [len(c) for c in self.y.chunks]:
            raise RuntimeError("cached inputs and targets do not pair up (model forward is not deterministic?)")
        groups: dict[tuple, list[int]] = {}
        for i, (cx, cy) in enumerate(zip(self.x.chunks, self.y.chunks)):
            groups.setdefault((tuple(cx.shape[1:]), tuple(cy.shape[1:])), []).append(i)
        self.groups = list(groups.values())
        self.offsets = [np.cumsum([0] + [len(self.x.chunks[i]) for i in ids]) for ids in self.groups]
        self.sizes = torch.tensor([float(o[-1]) for o in self.offsets], dtype=torch.float64)
        return self

    def _pieces(self, group: int, idx: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(chunk id, rows in it)`` of the sorted global indices ``idx`` of a shape group."""
        pieces = []
        offsets = self.offsets[group]
        for k, chunk_id in enumerate(self.groups[group]):
            start, stop = int(offsets[k]), int(offsets[k + 1])
            local = idx[(idx >= start) & (idx < stop)] - start
            if len(local):
                pieces.append((chunk_id, local))
        return pieces

    def _gather(self, group: int, idx: torch.Tensor, targets: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        pieces = self._pieces(group, idx)
        x = self._read(self.x.chunks, pieces, len(idx))
        return x, self._read(self.y.chunks, pieces, len(idx)) if targets else None

    @staticmethod
    def _read(chunks: list[torch.Tensor | _OnDisk], pieces: list[tuple[int, torch.Tensor]], n: int) -> torch.Tensor:
        # Every piece is written into one float32 tensor: a cat of float32 pieces held the mini-batch twice
        # (range initialisation reads 256 samples: 2 x 822 MB on a resnet50 layer1 input).
        out = torch.empty((n, *chunks[pieces[0][0]].shape[1:]), dtype=torch.float32)
        position = 0
        for chunk_id, local in pieces:
            _Store.take_into(chunks[chunk_id], local, out[position:position + len(local)])
            position += len(local)
        return out

    def output_size_per_sample(self) -> int:
        """Number of target values per sample (largest shape group)."""
        return max(1, max(math.prod(c.shape[1:]) for c in self.y.chunks)) if self.y.chunks else 1

    @property
    def num_samples(self) -> int:
        return int(self.sizes.sum().item())

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A random mini-batch from one shape group (chosen in proportion to its size)."""
        g = int(torch.multinomial(self.sizes, 1, generator=generator).item())
        idx = torch.randperm(int(self.sizes[g].item()), generator=generator)[:batch_size].sort().values
        return self._gather(g, idx)

    def iterate(self, batch_size: int, limit: int | None = None,
                targets: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """All samples in order (at most ``limit``), in mini-batches; ``targets=False`` reads the inputs only."""
        seen = 0
        for g in range(len(self.groups)):
            n = int(self.sizes[g].item())
            for start in range(0, n, batch_size):
                if limit is not None and seen >= limit:
                    return
                stop = min(start + batch_size, n, start + (limit - seen if limit is not None else n))
                seen += stop - start
                yield self._gather(g, torch.arange(start, stop), targets)

    def iterate_parts(self, batch_size: int, max_part_elements: int,
                      targets: bool) -> Iterator[tuple[int, Iterator[torch.Tensor]]]:
        """The inputs (or, with ``targets``, the FP outputs) of all samples in mini-batches of ``batch_size``, each
        as ``(number of values, slices)``: the slices are read one by one, at most ``max_part_elements`` values
        each (one sample at least), so a large mini-batch is never held whole. Same order as :meth:`iterate`."""
        store = self.y if targets else self.x
        for g, ids in enumerate(self.groups):
            n, per_sample = int(self.sizes[g].item()), math.prod(store.chunks[ids[0]].shape[1:])
            rows = max(1, max_part_elements // max(1, per_sample))
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                yield (stop - start) * per_sample, self._slices(store, g, start, stop, rows)

    def _slices(self, store: _Store, group: int, start: int, stop: int, rows: int) -> Iterator[torch.Tensor]:
        for first in range(start, stop, rows):
            idx = torch.arange(first, min(first + rows, stop))
            yield self._read(store.chunks, self._pieces(group, idx), len(idx))

    def cleanup(self) -> None:
        self.x.cleanup()
        self.y.cleanup()
