"""Range initialisation of a layer's input quantizer from its calibration cache (the weights':
:func:`~hf_adaquant.calibrate.init_weight_range`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..nn import QModuleMixin
from ..quant import RangeObserver
from .iocache import IOCache

if TYPE_CHECKING:
    from ..distributed import DataParallelSync

__all__ = ["init_input_range"]


@torch.no_grad()
def init_input_range(layer: QModuleMixin, cache: IOCache, method: str, seed: int,
                     sync: DataParallelSync | None = None, name: str = "") -> None:
    """Input quantizer range from the cached layer inputs (of all ranks' shards with ``sync``).

    Raises:
        ValueError: the range is not finite (naming the layer ``name``).
    """
    q = layer.input_quantizer
    if q is None:
        return
    observer = RangeObserver(seed=seed)
    error = None
    try:
        for x, _ in cache.iterate(256, targets=False):
            observer.update(x)
    except Exception as e:
        if sync is None:
            raise
        error = e
    if sync is not None:
        sync.context.sync_failure(error, "observing the layer inputs")
        sync.merge_observer(observer)
    try:
        q.set_range(*observer.compute(method, bits=q.bits, symmetric=q.symmetric))
    except ValueError as e:
        raise ValueError(f"input range of layer {name!r}: {e}") from None
