"""Range initialisation of a layer's activation quantizers from its calibration cache: the input quantizer from
the cached inputs, the output quantizer (layers feeding a residual add) from the cached FP outputs (the weights':
:func:`~hf_adaquant.calibrate.init_weight_range`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..nn import QModuleMixin
from ..quant import Quantizer, RangeObserver
from .iocache import IOCache

if TYPE_CHECKING:
    from ..distributed import DataParallelSync

__all__ = ["init_input_range", "init_output_range"]

# The observer subsamples a fixed share of each mini-batch of RANGE_BATCH samples (the ranges depend on it), and
# reads it in slices of at most RANGE_PART_ELEMENTS float32 values (64 MB): the same numbers as reading it whole.
RANGE_BATCH = 256
RANGE_PART_ELEMENTS = 1 << 24


def _init_range(q: Quantizer, cache: IOCache, targets: bool, method: str, seed: int, sync: DataParallelSync | None,
                what: str, name: str) -> None:
    """Set ``q``'s range from the cached inputs (or, with ``targets``, outputs) of all ranks' shards."""
    observer = RangeObserver(seed=seed)
    error = None
    try:
        for numel, parts in cache.iterate_parts(RANGE_BATCH, RANGE_PART_ELEMENTS, targets=targets):
            observer.update_parts(parts, numel)
    except Exception as e:
        if sync is None:
            raise
        error = e
    if sync is not None:
        sync.context.sync_failure(error, f"observing the layer {what}s")
        sync.merge_observer(observer)
    try:
        q.set_range(*observer.compute(method, bits=q.bits, symmetric=q.symmetric))
    except ValueError as e:
        raise ValueError(f"{what} range of layer {name!r}: {e}") from None


@torch.no_grad()
def init_input_range(layer: QModuleMixin, cache: IOCache, method: str, seed: int,
                     sync: DataParallelSync | None = None, name: str = "") -> None:
    """Input quantizer range from the cached layer inputs (of all ranks' shards with ``sync``).

    Raises:
        ValueError: the range is not finite (naming the layer ``name``).
    """
    if layer.input_quantizer is not None:
        _init_range(layer.input_quantizer, cache, False, method, seed, sync, "input", name)


@torch.no_grad()
def init_output_range(layer: QModuleMixin, cache: IOCache, method: str, seed: int,
                      sync: DataParallelSync | None = None, name: str = "") -> None:
    """Output quantizer range (if the layer has one) from the cached FP layer outputs, by the activation range
    ``method`` (of all ranks' shards with ``sync``).

    Raises:
        ValueError: the range is not finite (naming the layer ``name``).
    """
    if layer.output_quantizer is not None:
        _init_range(layer.output_quantizer, cache, True, method, seed, sync, "output", name)
