"""Which config fields each stage of a run reads: the one table the caches and fingerprints are built from.

A stage's result depends on the fields in its ``reads``; ``route`` lists fields it also reads that change only how
it gets there (memory bounds, capture route, progress bars), never the values it produces. Anything that keys a
stored result on the config (the sensitivity cache, the AdaQuant work dir) takes exactly ``reads``: a change to one
of them invalidates the stored result, a change to any other field reuses it. When a stage starts reading a new
field, add it here (the tests change every field and check which ones invalidate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .composed import AdaQuantConfig
from .optimizer import OptimizerConfig
from .scheme import SchemeConfig

__all__ = ["ADAQUANT_LAYERS", "LAYER_FIT", "PREPARE", "SENSITIVITY", "SENSITIVITY_ADVANCED", "TUNING",
           "StageFields"]


@dataclass(frozen=True)
class StageFields:
    """The config fields one stage reads (names checked against :class:`AdaQuantConfig` when declared)."""

    stage: str
    reads: tuple[str, ...]
    route: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.reads + self.route) - set(AdaQuantConfig.field_names()))
        if unknown:
            raise ValueError(f"stage {self.stage!r} declares unknown config fields {unknown}")

    def values(self, config: AdaQuantConfig) -> dict[str, Any]:
        """``{field: value}`` of the fields the stage reads, as JSON reads them back (tuples become lists)."""
        return {name: json.loads(json.dumps(getattr(config, name), default=list)) for name in self.reads}


def _minus(names: tuple[str, ...], *removed: str) -> tuple[str, ...]:
    return tuple(n for n in names if n not in removed)


PREPARE = StageFields("prepare", reads=_minus(SchemeConfig.field_names(), "weight_range_method",
                                              "activation_range_method"))
"""``prepare_model``: which layers are quantized, at which bits, with which zero-points."""

LAYER_FIT = StageFields("layer_fit", reads=(
    "iterations", "batch_size", "max_step_elements", "lr_weight", "lr_bias", "lr_weight_scale", "lr_act_scale",
    "lr_zero_point", "weight_deviation_limit", "weight_rounding", "rounding_regularization", "lr_rounding",
    "weight_range_method", "activation_range_method", "seed"))
"""``optimize_layer``: AdaQuant on one layer's cached inputs and outputs (range initialisation included)."""

ADAQUANT_LAYERS = StageFields(
    "adaquant_layers",
    reads=SchemeConfig.field_names() + OptimizerConfig.field_names() + ("seed", "cache_dtype"),
    route=("max_cache_bytes", "staged_propagation", "progress"))
"""The per-layer phase of the advanced pipeline (``run_adaquant``: what a work dir stores): the prepared model
(the whole scheme), the optimiser, the seed and the precision of the cached activations. Spilling to disk
(``max_cache_bytes``) and staged captures keep the same values; tuning, allocation and quantize-on-load fields are
read by other stages (the allocation's result reaches this stage as ``layer_bits``)."""

SENSITIVITY = StageFields(
    "sensitivity",
    reads=("pipeline", "first_last_bits", "include", "exclude", "pinned_layers", "candidate_weight_bits",
           "candidate_activation_bits", "sensitivity_criterion", "weight_symmetric", "activation_symmetric",
           "weight_range_method", "activation_range_method", "max_calibration_samples", "seed", "cache_dtype",
           "embedding_bits"),
    route=("max_cache_bytes", "weight_bits", "activation_bits", "layer_bits", "residual_output_bits"))
"""Sensitivity measurement in either pipeline. ``weight_bits``/``layer_bits`` are read by its ``prepare_model``
but every measured option sets the bits; ``activation_bits`` counts only as "weight-only or not" (the cache key
holds that flag); ``residual_output_bits`` is read there too, but each layer is measured on its own, without
output quantizers."""

SENSITIVITY_ADVANCED = StageFields("sensitivity_advanced", reads=_minus(LAYER_FIT.reads, *SENSITIVITY.reads))
"""What the measurement reads in the advanced pipeline only: AdaQuant's, through ``optimize_layer``."""

TUNING = StageFields("tuning", reads=(
    "pipeline", "bn_tuning", "bias_correction", "bias_correction_method", "bias_tuning", "bias_tuning_steps",
    "bias_tuning_lr", "bias_tuning_batch_size", "bias_tuning_max_elements", "seed"),
    route=("max_cache_bytes", "progress"))
"""BN tuning, bias correction (light) and bias tuning (advanced), after the weights are fitted."""
