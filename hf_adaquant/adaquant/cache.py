"""Per-layer calibration cache and its capture, under the names they had before they were split.

The cache itself (in-memory chunks spilling to disk) is :mod:`hf_adaquant.adaquant.iocache`, the hooks that fill
it :mod:`hf_adaquant.adaquant.capture`. This module re-exports both for code that imports them from here.
"""

from __future__ import annotations

from .capture import (StopForward, capture_layer_io, capture_layer_outputs, capture_layers_io, capture_with,
                      model_calls, observe_outputs)
from .iocache import IOCache, NonFiniteActivationError
from .spill import CacheBudget, SpillDir, save_chunk

__all__ = ["CacheBudget", "IOCache", "NonFiniteActivationError", "SpillDir", "StopForward", "capture_layer_io",
           "capture_layer_outputs", "capture_layers_io", "capture_with", "model_calls", "observe_outputs",
           "save_chunk"]
