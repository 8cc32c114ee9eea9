"""``SavedConfig``: what a saved checkpoint's ``quantization_config`` records besides the run's choices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checks import check_kinds
from .section import Section

__all__ = ["CONFIG_VERSION", "QUANT_METHOD", "SavedConfig"]

CONFIG_VERSION = 1
QUANT_METHOD = "adaquant"


@dataclass
class SavedConfig(Section):
    """Format fields (``config.saved``), read by :mod:`hf_adaquant.serialization` (so they live below it, not in
    the transformers integration): ``version`` of the config format, ``quant_method`` (always "adaquant", the name
    transformers dispatches on in ``config.json``) and ``checkpoint_layout``: set on saved checkpoints (per-layer
    bits and types, folded BatchNorms, output activations, layout version); None on a config for a new run.
    """

    version: int = CONFIG_VERSION
    quant_method: str = QUANT_METHOD
    checkpoint_layout: dict[str, Any] | None = None

    def validate(self) -> None:
        check_kinds(self, ints={"version": 1})
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        if self.version > CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is newer than this hf_adaquant ({CONFIG_VERSION})")
        if self.checkpoint_layout is not None and not isinstance(self.checkpoint_layout, dict):
            raise ValueError(f"checkpoint_layout must be a dict or None, got {type(self.checkpoint_layout)!r}")
