"""``AdaQuantConfig``: every choice of a quantization run, validated on build, JSON round-trip."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .quant.quantizer import MAX_BITS, MIN_BITS
from .quant.ranges import RANGE_METHODS

__all__ = ["AdaQuantConfig", "CONFIG_VERSION", "FLOAT_FIELDS"]

CONFIG_VERSION = 1
PIPELINES = ("light", "advanced")
VARIANTS = ("sequential", "parallel")
RECONSTRUCTIONS = ("layer", "block")
BIAS_CORRECTION_METHODS = ("single_pass", "per_layer")


# Field kinds, so that validate() checks every field by name (tests walk all fields against these checks).
_INT_FIELDS = {"iterations": 0, "batch_size": 1, "max_step_elements": 1, "bias_tuning_steps": 0,
               "bias_tuning_batch_size": 1, "bias_tuning_max_elements": 1, "max_cache_bytes": 0, "seed": None,
               "version": 1, "num_samples": 1, "max_length": 1, "calibration_batch_size": 1}  # name: minimum
_OPTIONAL_INT_FIELDS = {"max_calibration_samples": 1}
NON_NEGATIVE_FLOAT_FIELDS = ("lr_weight", "lr_bias", "lr_weight_scale", "lr_act_scale", "lr_zero_point",
                             "rounding_regularization", "lr_rounding", "bias_tuning_lr", "activation_drop")
POSITIVE_OPTIONAL_FLOAT_FIELDS = ("weight_deviation_limit", "size_budget", "bops_budget")
FLOAT_FIELDS = NON_NEGATIVE_FLOAT_FIELDS + POSITIVE_OPTIONAL_FLOAT_FIELDS
"""Fields holding real numbers: text front ends (recipes, ``--set``) convert ``"1e-3"`` strings for these."""
_BOOL_FIELDS = ("weight_symmetric", "activation_symmetric", "bn_tuning", "bias_correction", "bias_tuning",
                "progress", "staged_propagation")
_STR_FIELDS = {"dataset_split": False, "dataset_config_name": True, "text_column": True}  # name: None allowed


def _choices() -> dict[str, tuple[str, ...]]:
    """Enum fields and their accepted values (range methods can be registered at run time)."""
    return {"pipeline": PIPELINES, "variant": VARIANTS, "reconstruction": RECONSTRUCTIONS,
            "weight_range_method": tuple(sorted(RANGE_METHODS)),
            "activation_range_method": tuple(sorted(RANGE_METHODS)) + ("mean_minmax",),
            "weight_rounding": ("auto", "free", "learned"), "bias_correction_method": BIAS_CORRECTION_METHODS,
            "size_budget_unit": ("fraction", "bits", "bytes"), "bops_budget_unit": ("fraction", "absolute"),
            "sensitivity_criterion": ("kl", "mse", "task"), "cache_dtype": ("float16", "float32")}


def _wrong_type(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int | None, allow_none: bool = False) -> int | None:
    """``value`` as a Python int (numpy integers accepted; bools, floats and strings are not)."""
    if value is None and allow_none:
        return None
    bound = "" if minimum is None else f" >= {minimum}"
    expected = f"an integer{bound}{' or None' if allow_none else ''}"
    if not _is_int(value):
        raise _wrong_type(name, expected, value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _check_number(name: str, value: Any, strictly_positive: bool, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    expected = f"a finite number {'> 0' if strictly_positive else '>= 0'}{' or None' if allow_none else ''}"
    if isinstance(value, str):  # e.g. YAML 1.1 reads 1e-3 (no dot) as a string
        raise ValueError(f"{name} must be {expected}, got the string {value!r}; pass a number (1e-3, not '1e-3')")
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise _wrong_type(name, expected, value)
    if not math.isfinite(value) or value < 0 or (strictly_positive and value == 0):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_bits(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}"
                         f"{' or None' if allow_none else ''}, got {value!r}")


def _check_patterns(name: str, value: Any) -> list[str] | None:
    """A list of fnmatch patterns; one pattern string is a one-pattern list (a string is not iterated)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise _wrong_type(name, "a layer-name pattern or a list of them (strings), or None", value)
    return list(value)


def _check_bits_map(name: str, value: Any) -> dict[str, tuple[int, int | None]]:
    """``{layer name or pattern: (weight_bits, activation_bits)}`` with tuple values."""
    if not isinstance(value, Mapping):
        raise _wrong_type(name, "a dict {layer name: (weight_bits, activation_bits)}", value)
    out = {}
    for key, bits in value.items():
        if not isinstance(key, str):
            raise _wrong_type(f"{name} key", "a layer name or pattern (string)", key)
        if not isinstance(bits, (tuple, list)) or len(bits) != 2:
            raise ValueError(f"{name}[{key!r}] must be (weight_bits, activation_bits), got {bits!r}")
        _check_bits(f"{name}[{key!r}] weight bits", bits[0])
        _check_bits(f"{name}[{key!r}] activation bits", bits[1], allow_none=True)
        out[key] = (int(bits[0]), None if bits[1] is None else int(bits[1]))
    return out


def _check_calibration_source(dataset: Any, tokenizer: Any) -> None:
    """Quantize-on-load inputs: a dataset name/path, a list, or a ``datasets`` object; a tokenizer name or object."""
    if not (dataset is None or isinstance(dataset, (str, os.PathLike, list, tuple)) or hasattr(dataset, "__iter__")):
        raise _wrong_type("dataset", "a dataset name or path, a list, or a datasets.Dataset, or None", dataset)
    if isinstance(tokenizer, (bool, numbers.Number, bytes, list, tuple, Mapping)):
        raise _wrong_type("tokenizer", "a tokenizer object or name, or None", tokenizer)


@dataclass
class AdaQuantConfig(QuantizationConfigMixin):
    """Configuration of :func:`hf_adaquant.quantize`.

    Bits and policy:
        weight_bits / activation_bits: default precision (2..8; ``activation_bits=None`` keeps activations float).
        first_last_bits: precision floor of the first and last quantized layers (None: no exception).
        include / exclude: one fnmatch pattern on layer names or a list of them. layer_bits: ``{name or pattern:
        (w, a)}`` per-layer overrides (what bit allocation produces; e.g. ``{"*.conv_dw": (8, 8)}``; exact names
        win over patterns).
        embedding_bits: bits per value of ``nn.Embedding`` tables (BERT word/position/type embeddings), one min-max
        step and zero-point per row (2..8; None keeps them float). The quantized model computes with the stored
        table. ``exclude`` patterns apply to embeddings too; tables tied to another layer (LM heads) stay float.
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
        reconstruction: what AdaQuant fits to the FP model. "layer" (the paper's): each layer's output, layer by
        layer. "block" (BRECQ-style, sequential variant only): all quantized layers of a stage of the staged engine
        (a residual block, a transformer layer; see :mod:`hf_adaquant.adaquant.stages`) jointly, with the same
        parameters, on the MSE of the block's output against the FP block's output, the block's inputs coming
        from the quantized prefix; layers before the first / after the last block stay per layer. Block mode
        always uses the staged engine (whatever ``staged_propagation`` says) and falls back to "layer", with a
        warning saying why, on a model whose blocks do not form a chain.
        activation_drop: QDrop's drop probability ``p`` in [0, 1], block reconstruction only. While a block is
        optimised, each element of each quantized layer's input is left in float with probability ``p`` and
        quantized otherwise (a fresh seeded mask every step): 0 quantizes every element (plain block
        reconstruction, bitwise), 1 none; the paper's value is 0.5. Evaluations during the run and the final
        model always quantize every element.
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
        against the FP outputs) or "task" (needs labels); pinned_layers fixes some layers' ``(w, a)``. A budget
        and layer_bits exclude each other (the budget would be ignored); the allocation's result is a config with
        layer_bits and no budget (the budget is kept in the run report's ``allocation``).

    Resources:
        max_calibration_samples: use at most this many calibration samples. cache_dtype: "float16" or "float32"
        storage of cached activations. max_cache_bytes: cached activations above this spill to disk.
        staged_propagation: sequential captures run the model stage by stage (O(depth) forward work) when its
        blocks form a chain; False forces whole-model captures (same inputs, depth-squared work).
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
    embedding_bits: int | None = 8
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
    reconstruction: str = "layer"
    activation_drop: float = 0.0
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
    staged_propagation: bool = True
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
        """Raise ``ValueError`` naming the field, what it must be and what it got; normalise accepted forms.

        Every field is type-checked (integers are not bools, floats accept integers, enums list their values);
        a single ``include``/``exclude`` pattern string becomes a one-pattern list and lists of bits become
        tuples, so that the config reads the same whichever way it was written.
        """
        for name, minimum in _INT_FIELDS.items():
            setattr(self, name, _check_int(name, getattr(self, name), minimum))
        for name, minimum in _OPTIONAL_INT_FIELDS.items():
            setattr(self, name, _check_int(name, getattr(self, name), minimum, allow_none=True))
        for name in NON_NEGATIVE_FLOAT_FIELDS:
            _check_number(name, getattr(self, name), strictly_positive=False)
        for name in POSITIVE_OPTIONAL_FLOAT_FIELDS:
            _check_number(name, getattr(self, name), strictly_positive=True, allow_none=True)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise _wrong_type(name, "True or False", getattr(self, name))
        if self.weight_range_method == "mean_minmax":
            raise ValueError("weight_range_method 'mean_minmax' is for activations; use 'minmax' or 'mse'")
        for name, choices in _choices().items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}")
        for name, optional in _STR_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, str) and not (optional and value is None):
                raise _wrong_type(name, "a string" + (" or None" if optional else ""), value)
        self._validate_bits()
        self._validate_budget()
        self._validate_reconstruction()
        if self.quant_method != "adaquant":
            raise ValueError(f"quant_method must be 'adaquant', got {self.quant_method!r}")
        if self.version > CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is newer than this hf_adaquant ({CONFIG_VERSION})")
        if self.checkpoint_layout is not None and not isinstance(self.checkpoint_layout, dict):
            raise ValueError(f"checkpoint_layout must be a dict or None, got {type(self.checkpoint_layout)!r}")
        _check_calibration_source(self.dataset, self.tokenizer)

    def _validate_bits(self) -> None:
        _check_bits("weight_bits", self.weight_bits)
        _check_bits("activation_bits", self.activation_bits, allow_none=True)
        _check_bits("first_last_bits", self.first_last_bits, allow_none=True)
        _check_bits("embedding_bits", self.embedding_bits, allow_none=True)
        self.include = _check_patterns("include", self.include)
        self.exclude = _check_patterns("exclude", self.exclude)
        self.layer_bits = _check_bits_map("layer_bits", self.layer_bits)
        self.pinned_layers = _check_bits_map("pinned_layers", self.pinned_layers)
        for name in ("candidate_weight_bits", "candidate_activation_bits"):
            values = getattr(self, name)
            if isinstance(values, tuple):
                values = list(values)
            if not isinstance(values, list):
                raise _wrong_type(name, "a list of bit-widths", values)
            if not values:
                raise ValueError(f"{name} must list at least one bit-width")
            for bits in values:
                _check_bits(name, bits)
            setattr(self, name, [int(bits) for bits in values])

    def _validate_budget(self) -> None:
        # A budget is solved into per-layer bits; layer_bits would override every layer it names, so the
        # budget would silently not hold. A saved checkpoint's config records a finished run: older versions
        # stored the budget next to the layer_bits it produced, and those must still load.
        if self.has_budget and self.layer_bits and self.checkpoint_layout is None:
            budgets = [n for n in ("size_budget", "bops_budget") if getattr(self, n) is not None]
            raise ValueError(f"{' and '.join(budgets)} cannot be combined with layer_bits: layer_bits fixes the "
                             "bits of the layers it names, so the budget would be ignored. To fix some layers "
                             "inside a budget use pinned_layers={name: (weight_bits, activation_bits)}; "
                             "otherwise drop the budget or layer_bits")

    def _validate_reconstruction(self) -> None:
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
        for name in ("layer_bits", "pinned_layers"):  # JSON lists become tuples in validate()
            if data.get(name) is None:
                data[name] = {}
        data.update({k: v for k, v in kwargs.items() if k in known})
        config = cls(**data)
        if return_unused_kwargs:
            return config, {k: v for k, v in kwargs.items() if k not in known}
        return config

    def replace(self, **changes: Any) -> "AdaQuantConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)
