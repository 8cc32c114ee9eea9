"""``ResourcesConfig``: how much data, memory and randomness a run uses, and whether it shows progress."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import check_kinds
from .section import Section

__all__ = ["ResourcesConfig"]


@dataclass
class ResourcesConfig(Section):
    """Resources (``config.resources``).

    max_calibration_samples: use at most this many calibration samples. cache_dtype: "float16" or "float32" storage
    of cached activations. max_cache_bytes: cached activations above this spill to disk. staged_propagation:
    sequential captures run the model stage by stage (O(depth) forward work) when its blocks form a chain; False
    forces whole-model captures (same inputs, depth-squared work). seed: fixes every random choice. progress: tqdm
    bars.
    """

    max_calibration_samples: int | None = None
    cache_dtype: str = "float16"
    max_cache_bytes: int = 4 << 30
    staged_propagation: bool = True
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        check_kinds(self, ints={"max_cache_bytes": 0, "seed": None}, optional_ints={"max_calibration_samples": 1},
                    bools=("staged_propagation", "progress"), choices={"cache_dtype": ("float16", "float32")})
