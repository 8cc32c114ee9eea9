"""``TuningConfig``: the stages after the weights are fitted (BN tuning, bias correction, bias tuning)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .checks import check_kinds
from .section import Section

__all__ = ["BIAS_CORRECTION_METHODS", "TuningConfig"]

BIAS_CORRECTION_METHODS = ("single_pass", "per_layer")


@dataclass
class TuningConfig(Section):
    """Tuning stages (``config.tuning``).

    bn_tuning, bias_correction (light pipeline), bias_tuning (advanced pipeline) switch the stages.
    bias_correction_method: "single_pass" (every layer corrected inside one quantized pass per batch, with a running
    average across batches) or "per_layer" (exact, one pass per layer: cost grows with depth squared).
    bias_tuning_steps / bias_tuning_lr / bias_tuning_batch_size: Adam steps, rate and samples per step;
    bias_tuning_max_elements bounds the layer outputs one backward pass holds (a larger step accumulates its
    gradient over slices: same gradient, bounded memory).
    """

    NON_NEGATIVE_FLOATS: ClassVar[tuple[str, ...]] = ("bias_tuning_lr",)

    bn_tuning: bool = True
    bias_correction: bool = True
    bias_correction_method: str = "single_pass"
    bias_tuning: bool = True
    bias_tuning_steps: int = 200
    bias_tuning_lr: float = 1e-4
    bias_tuning_batch_size: int = 32
    bias_tuning_max_elements: int = 1 << 28

    def validate(self) -> None:
        check_kinds(self, ints={"bias_tuning_steps": 0, "bias_tuning_batch_size": 1, "bias_tuning_max_elements": 1},
                    non_negative=self.NON_NEGATIVE_FLOATS, bools=("bn_tuning", "bias_correction", "bias_tuning"),
                    choices={"bias_correction_method": BIAS_CORRECTION_METHODS})
