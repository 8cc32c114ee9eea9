"""``AdaQuantConfig``: every choice of a quantization run, validated on build, JSON round-trip."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quant.quantizer import MAX_BITS, MIN_BITS
from .quant.ranges import RANGE_METHODS

__all__ = ["AdaQuantConfig", "CONFIG_VERSION"]

CONFIG_VERSION = 1
PIPELINES = ("light", "advanced")
VARIANTS = ("sequential", "parallel")
BIAS_CORRECTION_METHODS = ("single_pass", "per_layer")


def _check_bits(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}"
                         f"{' or None' if allow_none else ''}, got {value!r}")


@dataclass
class AdaQuantConfig(QuantizationConfigMixin):
    """Configuration of :func:`hf_adaquant.quantize`.

    Bits and policy:
        weight_bits / activation_bits: default precision (2..8; ``activation_bits=None`` keeps activations float).
        first_last_bits: precision floor of the first and last quantized layers (None: no exception).
        include / exclude: fnmatch patterns on layer names. layer_bits: ``{name or pattern: (w, a)}`` per-layer
        overrides (what bit allocation produces; e.g. ``{"*.conv_dw": (8, 8)}``; exact names win over patterns).
        weight_symmetric / activation_symmetric: zero-point fixed at 0.
        weight_range_method / activation_range_method: "minmax", "mean_minmax" (activations; the paper's),
        "mse" or "percentile".

    Pipeline:
        pipeline: "light" (ranges + BN tuning + bias correction, no backprop) or "advanced" (AdaQuant + BN tuning
        + bias tuning). variant: AdaQuant inputs from the quantized prefix ("sequential") or from the FP model
        ("parallel"). iterations / batch_size: AdaQuant steps per layer and samples per step; layers with large
        feature maps take fewer samples per step so one step handles at most ``max_step_elements`` output values.
        lr_weight / lr_weight_scale / lr_act_scale: Adam learning rates *relative to the quantization step* (each
        output channel's own step for W' and the weight step)
        (scale-free across layers); lr_bias and lr_zero_point are absolute (bias units, integer grid units).
        weight_deviation_limit: bound on ``|W' - W|`` in weight steps (None: unconstrained, as in the paper).
        weight_rounding: "free" (the paper's continuous W'), "learned" (W' restricted to rounding each weight
        up or down, AdaRound-style; far fewer effective degrees of freedom) or "auto" (learned for layers at
        <= 3 weight bits, where free W' overfits; free otherwise), with
        rounding_regularization (weight of the push-to-0/1 term) and lr_rounding (Adam lr of the rounding logits).
        bn_tuning, bias_correction (light), bias_tuning (advanced) switch the tuning stages.
        bias_correction_method: "single_pass" (every layer corrected inside one quantized pass per batch, with a
        running average across batches) or "per_layer" (exact, one pass per layer: cost grows with depth squared).
        bias_tuning_steps / bias_tuning_lr / bias_tuning_batch_size: Adam steps, rate and samples per step;
        bias_tuning_max_elements bounds the layer outputs one backward pass holds (a step whose batch would exceed
        it accumulates its gradient over slices: same gradient, bounded memory).

    Bit allocation (integer programming; active when a budget is set):
        size_budget (+ size_budget_unit "fraction" of FP32 weight size, "bits" or "bytes") and/or bops_budget
        (+ bops_budget_unit "fraction" of FP32 BOPs or "absolute"). candidate_weight_bits x
        candidate_activation_bits are the per-layer options; sensitivity_criterion "kl" or "mse" (label-free,
        against the FP outputs) or "task" (needs labels); pinned_layers fixes some layers' ``(w, a)``.

    Resources:
        max_calibration_samples: use at most this many calibration samples. cache_dtype: "float16" or "float32"
        storage of cached activations. max_cache_bytes: cached activations above this spill to disk.
        seed: fixes every random choice. progress: tqdm bars.

    transformers integration (``AdaQuantConfig`` is a ``QuantizationConfigMixin``, registered as "adaquant"):
        quant_method: always "adaquant". checkpoint_layout: set on saved checkpoints (per-layer bits and types,
        folded BatchNorms, output activations, layout version); None on a config for a new run.
        Quantize on load (``AutoModelForX.from_pretrained(fp_dir, quantization_config=AdaQuantConfig(...))``):
        dataset (a ``datasets`` Hub name, a local json file / saved dataset dir, a ``datasets.Dataset`` or a list
        of strings / input dicts), tokenizer (object or name; text is tokenised with it), num_samples, max_length,
        dataset_config_name, dataset_split, text_column (None: "text", or "question" + "context", or the first
        string column), calibration_batch_size. In-memory data and tokenizer objects are not serialised.
    """

    weight_bits: int = 4
    activation_bits: int | None = 8
    pipeline: str = "advanced"
    variant: str = "sequential"
    first_last_bits: int | None = 8
    include: list[str] | None = None
    exclude: list[str] | None = None
    layer_bits: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    weight_symmetric: bool = False
    activation_symmetric: bool = False
    weight_range_method: str = "mse"
    activation_range_method: str = "mse"
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
    rounding_regularization: float = 0.01
    lr_rounding: float = 1e-1
    bn_tuning: bool = True
    bias_correction: bool = True
    bias_correction_method: str = "single_pass"
    bias_tuning: bool = True
    bias_tuning_steps: int = 200
    bias_tuning_lr: float = 1e-4
    bias_tuning_batch_size: int = 32
    bias_tuning_max_elements: int = 1 << 28
    size_budget: float | None = None
    size_budget_unit: str = "fraction"
    bops_budget: float | None = None
    bops_budget_unit: str = "fraction"
    candidate_weight_bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    candidate_activation_bits: list[int] = field(default_factory=lambda: [4, 8])
    sensitivity_criterion: str = "kl"
    pinned_layers: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    max_calibration_samples: int | None = None
    cache_dtype: str = "float16"
    max_cache_bytes: int = 4 << 30
    seed: int = 0
    progress: bool = True
    version: int = CONFIG_VERSION
    quant_method: str = "adaquant"
    checkpoint_layout: dict[str, Any] | None = None
    dataset: Any = None
    tokenizer: Any = None
    num_samples: int = 128
    max_length: int = 128
    dataset_config_name: str | None = None
    dataset_split: str = "train"
    text_column: str | None = None
    calibration_batch_size: int = 8

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and the accepted values."""
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("activation_bits", self.activation_bits, allow_none=True)
        _check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        for name, bits in self.layer_bits.items():
            if not isinstance(bits, (tuple, list)) or len(bits) != 2:
                raise ValueError(f"layer_bits[{name!r}] must be (weight_bits, activation_bits), got {bits!r}")
            _check_bits(f"layer_bits[{name!r}] weight bits", bits[0])
            _check_bits(f"layer_bits[{name!r}] activation bits", bits[1], allow_none=True)
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        methods = sorted(RANGE_METHODS) + ["mean_minmax"]
        for name in ("weight_range_method", "activation_range_method"):
            if getattr(self, name) not in methods:
                raise ValueError(f"{name} must be one of {methods}, got {getattr(self, name)!r}")
        if self.weight_range_method == "mean_minmax":
            raise ValueError("weight_range_method 'mean_minmax' is for activations; use 'minmax' or 'mse'")
        for name in ("iterations", "batch_size", "max_step_elements", "bias_tuning_steps", "bias_tuning_batch_size",
                     "bias_tuning_max_elements"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name in ("iterations", "bias_tuning_steps") else 1):
                raise ValueError(f"{name} must be a non-negative integer (batch sizes and element limits >= 1), got {value!r}")
        for name in ("lr_weight", "lr_bias", "lr_weight_scale", "lr_act_scale", "lr_zero_point", "bias_tuning_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.bias_correction_method not in BIAS_CORRECTION_METHODS:
            raise ValueError(f"bias_correction_method must be one of {BIAS_CORRECTION_METHODS}, "
                             f"got {self.bias_correction_method!r}")
        if self.weight_rounding not in ("auto", "free", "learned"):
            raise ValueError(f"weight_rounding must be 'auto', 'free' or 'learned', got {self.weight_rounding!r}")
        if not self.rounding_regularization >= 0 or not self.lr_rounding >= 0:
            raise ValueError("rounding_regularization and lr_rounding must be >= 0")
        if self.weight_deviation_limit is not None and not self.weight_deviation_limit > 0:
            raise ValueError(f"weight_deviation_limit must be > 0 or None, got {self.weight_deviation_limit!r}")
        for name in ("candidate_weight_bits", "candidate_activation_bits"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must list at least one bit-width")
            for bits in values:
                _check_bits(name, bits)
        for name, bits in self.pinned_layers.items():
            if not isinstance(bits, (tuple, list)) or len(bits) != 2:
                raise ValueError(f"pinned_layers[{name!r}] must be (weight_bits, activation_bits), got {bits!r}")
            _check_bits(f"pinned_layers[{name!r}] weight bits", bits[0])
            _check_bits(f"pinned_layers[{name!r}] activation bits", bits[1], allow_none=True)
        if self.sensitivity_criterion not in ("kl", "mse", "task"):
            raise ValueError(f"sensitivity_criterion must be 'kl', 'mse' or 'task', got {self.sensitivity_criterion!r}")
        for name, units in (("size_budget_unit", ("fraction", "bits", "bytes")),
                            ("bops_budget_unit", ("fraction", "absolute"))):
            if getattr(self, name) not in units:
                raise ValueError(f"{name} must be one of {units}, got {getattr(self, name)!r}")
        for name in ("size_budget", "bops_budget"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 or None, got {getattr(self, name)!r}")
        if self.cache_dtype not in ("float16", "float32"):
            raise ValueError(f"cache_dtype must be 'float16' or 'float32', got {self.cache_dtype!r}")
        if self.max_calibration_samples is not None and self.max_calibration_samples < 1:
            raise ValueError("max_calibration_samples must be >= 1 or None")
        if self.version > CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is newer than this hf_adaquant ({CONFIG_VERSION})")
        if self.quant_method != "adaquant":
            raise ValueError(f"quant_method must be 'adaquant', got {self.quant_method!r}")
        if self.checkpoint_layout is not None and not isinstance(self.checkpoint_layout, dict):
            raise ValueError(f"checkpoint_layout must be a dict or None, got {type(self.checkpoint_layout)!r}")
        for name in ("num_samples", "max_length", "calibration_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    @property
    def has_budget(self) -> bool:
        return self.size_budget is not None or self.bops_budget is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (in-memory calibration data is dropped, a tokenizer object becomes its name)."""
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("dataset", "tokenizer")}
        data["dataset"] = self.dataset if isinstance(self.dataset, str) else None
        data["tokenizer"] = (self.tokenizer if isinstance(self.tokenizer, str) or self.tokenizer is None
                             else getattr(self.tokenizer, "name_or_path", None) or None)
        data["layer_bits"] = {k: list(v) for k, v in self.layer_bits.items()}
        data["pinned_layers"] = {k: list(v) for k, v in self.pinned_layers.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], return_unused_kwargs: bool = False,
                  **kwargs: Any) -> "AdaQuantConfig" | tuple["AdaQuantConfig", dict[str, Any]]:
        """Inverse of :meth:`to_dict`; ``kwargs`` naming fields override (transformers' calling convention)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdaQuantConfig fields {unknown}; accepted: {sorted(known)}")
        data = dict(data)
        data["layer_bits"] = {k: tuple(v) for k, v in (data.get("layer_bits") or {}).items()}
        data["pinned_layers"] = {k: tuple(v) for k, v in (data.get("pinned_layers") or {}).items()}
        data.update({k: v for k, v in kwargs.items() if k in known})
        config = cls(**data)
        if return_unused_kwargs:
            return config, {k: v for k, v in kwargs.items() if k not in known}
        return config

    def replace(self, **changes: Any) -> "AdaQuantConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
