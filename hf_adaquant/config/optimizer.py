"""``OptimizerConfig``: whether AdaQuant runs (the pipeline) and how it fits each layer or block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .checks import check_kinds
from .section import Section

__all__ = ["OptimizerConfig", "PIPELINES", "RECONSTRUCTIONS", "VARIANTS", "WEIGHT_ROUNDINGS"]

PIPELINES = ("light", "advanced")
VARIANTS = ("sequential", "parallel")
RECONSTRUCTIONS = ("layer", "block")
WEIGHT_ROUNDINGS = ("auto", "free", "learned")


@dataclass
class OptimizerConfig(Section):
    """The AdaQuant optimiser (``config.optimizer``).

    pipeline: "light" (ranges + BN tuning + bias correction, no backprop) or "advanced" (AdaQuant + BN tuning +
    bias tuning). variant: AdaQuant inputs from the quantized prefix ("sequential") or from the FP model
    ("parallel"). iterations / batch_size: AdaQuant steps per layer and samples per step; layers with large feature
    maps take fewer samples per step so one step handles at most ``max_step_elements`` output values.
    lr_weight / lr_weight_scale / lr_act_scale: Adam learning rates *relative to the quantization step* (each output
    channel's own step for W' and the weight step); lr_bias and lr_zero_point are absolute (bias units, integer
    grid units). weight_deviation_limit: bound on ``|W' - W|`` in weight steps (None: unconstrained, the paper's).
    weight_rounding: "free" (the paper's continuous W'), "learned" (each weight rounded up or down, AdaRound-style)
    or "auto" (learned at <= 3 weight bits, free otherwise), with rounding_regularization (weight of the
    push-to-0/1 term) and lr_rounding (Adam lr of the rounding logits).
    reconstruction: "layer" (the paper's: each layer's output) or "block" (BRECQ-style, sequential variant only:
    the quantized layers of a stage of :mod:`hf_adaquant.adaquant.stages` jointly, on the block's output; falls back
    to "layer", with a warning, on a model whose blocks do not form a chain).
    activation_drop: QDrop's probability ``p`` in [0, 1] of leaving an input element in float while a block is
    optimised (block reconstruction only; 0: plain block reconstruction, bitwise; the paper's value is 0.5).
    """

    NON_NEGATIVE_FLOATS: ClassVar[tuple[str, ...]] = (
        "lr_weight", "lr_bias", "lr_weight_scale", "lr_act_scale", "lr_zero_point", "rounding_regularization",
        "lr_rounding", "activation_drop")
    POSITIVE_OPTIONAL_FLOATS: ClassVar[tuple[str, ...]] = ("weight_deviation_limit",)

    pipeline: str = "advanced"
    variant: str = "sequential"
    iterations: int = 200
    batch_size: int = 50
    max_step_elements: int = 1 << 22
    lr_weight: float = 1e-3
    lr_bias: float = 1e-3
    lr_weight_scale: float = 1e-3
    lr_act_scale: float = 1e-2
    lr_zero_point: float = 1e-2
    weight_deviation_limit: float | None = None
    weight_rounding: str = "auto"
    reconstruction: str = "layer"
    activation_drop: float = 0.0
    rounding_regularization: float = 0.01
    lr_rounding: float = 1e-1

    def validate(self) -> None:
        check_kinds(self, ints={"iterations": 0, "batch_size": 1, "max_step_elements": 1},
                    non_negative=self.NON_NEGATIVE_FLOATS, positive_optional=self.POSITIVE_OPTIONAL_FLOATS,
                    choices={"pipeline": PIPELINES, "variant": VARIANTS, "reconstruction": RECONSTRUCTIONS,
                             "weight_rounding": WEIGHT_ROUNDINGS})
        if self.activation_drop > 1:
            raise ValueError(f"activation_drop must be a finite number in [0, 1] (the probability of leaving an "
                             f"activation element in float), got {self.activation_drop!r}")
        if self.reconstruction == "block" and self.variant != "sequential":
            raise ValueError("reconstruction='block' needs variant='sequential' (block inputs come from the "
                             f"quantized prefix), got variant={self.variant!r}; accepted reconstructions with the "
                             "parallel variant: ['layer']")
        if self.activation_drop > 0 and self.reconstruction != "block":
            raise ValueError(f"activation_drop={self.activation_drop!r} applies to reconstruction='block' only "
                             f"(got reconstruction={self.reconstruction!r}); accepted: reconstruction='block', "
                             "or activation_drop=0.0")
