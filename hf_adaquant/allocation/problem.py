"""Types of the bit-allocation problem: a candidate precision, the problem, a chosen allocation.

Every layer ``l`` picks exactly one option ``k`` (a weight/activation bit-width pair); ``sensitivity[l, k]`` is the
increase of the calibration criterion when only layer ``l`` takes option ``k`` (``np.nan``: not allowed). Solved by
:func:`hf_adaquant.allocation.solver.solve_allocation`. Pure numpy (no torch), so cached matrices can be used alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["FP32_BITS", "Allocation", "AllocationProblem", "BitOption"]

FP32_BITS = 32
"""Bits per weight and per activation of the float model that "fraction" budgets are relative to."""
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class BitOption:
    """One candidate precision for a layer: weight and input-activation bit-widths."""

    weight_bits: int
    activation_bits: int

    def __post_init__(self) -> None:
        for name in ("weight_bits", "activation_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"BitOption.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"BitOption.{name} must be >= 1, got {value}")
            object.__setattr__(self, name, int(value))

    @property
    def label(self) -> str:
        """Short label such as ``"W4A8"``."""
        return f"W{self.weight_bits}A{self.activation_bits}"

    def __str__(self) -> str:
        return self.label

    def to_dict(self) -> dict[str, int]:
        """JSON-safe representation."""
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BitOption:
        """Inverse of :meth:`to_dict`."""
        return cls(int(data["weight_bits"]), int(data["activation_bits"]))


@dataclass
class AllocationProblem:
    """Inputs of the bit-allocation integer program.

    Attributes:
        layer_names: Names of the ``L`` layers (unique).
        options: The ``K`` candidate options, shared by all layers (unique).
        sensitivity: ``(L, K)`` criterion increase when only that layer takes that option. ``np.nan`` = option not
            allowed for that layer. Negative values are allowed (real measurements); infinities are not. A pinned
            layer's ``nan`` at its pinned option counts as 0 in the predicted criterion (it is a constant anyway).
        num_params: ``(L,)`` weight count per layer (non-negative integers).
        macs: ``(L,)`` multiply-accumulates per sample per layer (non-negative).
        pinned: Layers forced to one option, ``{layer_name: option}``.
    """

    layer_names: list[str]
    options: list[BitOption]
    sensitivity: np.ndarray
    num_params: np.ndarray
    macs: np.ndarray
    pinned: dict[str, BitOption] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layer_names = list(self.layer_names)
        self.options = list(self.options)
        self.pinned = dict(self.pinned)
        self.sensitivity = np.array(self.sensitivity, dtype=np.float64)
        self.macs = np.array(self.macs, dtype=np.float64)
        params = np.asarray(self.num_params)
        if params.dtype.kind == "f":
            if not np.all(np.isfinite(params)) or np.any(params != np.round(params)):
                raise ValueError("num_params must hold integer weight counts")
        self.num_params = np.array(params, dtype=np.int64)
        self.validate()

    # -- validation -------------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Check shapes and values; raise ``ValueError`` naming the offending layer."""
        num_layers, num_options = len(self.layer_names), len(self.options)
        if num_layers == 0:
            raise ValueError("AllocationProblem needs at least one layer")
        if num_options == 0:
            raise ValueError("AllocationProblem needs at least one option")
        if len(set(self.layer_names)) != num_layers:
            dupes = sorted({n for n in self.layer_names if self.layer_names.count(n) > 1})
            raise ValueError(f"duplicate layer names: {dupes}")
        for opt in self.options:
            if not isinstance(opt, BitOption):
                raise TypeError(f"options must be BitOption instances, got {opt!r}")
        if len(set(self.options)) != num_options:
            raise ValueError(f"duplicate options in {[o.label for o in self.options]}")
        if self.sensitivity.shape != (num_layers, num_options):
            raise ValueError(
                f"sensitivity has shape {self.sensitivity.shape}, expected (L, K) = ({num_layers}, {num_options})"
            )
        for arr, name in ((self.num_params, "num_params"), (self.macs, "macs")):
            if arr.shape != (num_layers,):
                raise ValueError(f"{name} has shape {arr.shape}, expected ({num_layers},)")
            bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
            if bad.size:
                layer = self.layer_names[bad[0]]
                raise ValueError(f"{name} of layer {layer!r} is {arr[bad[0]]}; must be finite and >= 0")
        infs = np.argwhere(np.isinf(self.sensitivity))
        if infs.size:
            l, k = infs[0]
            raise ValueError(
                f"sensitivity of layer {self.layer_names[l]!r} for option {self.options[k].label} is infinite; "
                "use np.nan to mark a disallowed option"
            )
        names = set(self.layer_names)
        option_set = set(self.options)
        for layer, opt in self.pinned.items():
            if layer not in names:
                raise ValueError(f"pinned layer {layer!r} is not in layer_names")
            if opt not in option_set:
                raise ValueError(
                    f"layer {layer!r} is pinned to {opt!r}, which is not one of the options "
                    f"{[o.label for o in self.options]}"
                )
        allowed = self.allowed_mask()
        empty = np.flatnonzero(~allowed.any(axis=1))
        if empty.size:
            raise ValueError(f"layer {self.layer_names[empty[0]]!r} has no allowed option (all sensitivities are nan)")

    # -- derived quantities -----------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        """``L``."""
        return len(self.layer_names)

    @property
    def num_options(self) -> int:
        """``K``."""
        return len(self.options)

    @property
    def weight_bits(self) -> np.ndarray:
        """``(K,)`` weight bits per option."""
        return np.array([o.weight_bits for o in self.options], dtype=np.int64)

    @property
    def activation_bits(self) -> np.ndarray:
        """``(K,)`` activation bits per option."""
        return np.array([o.activation_bits for o in self.options], dtype=np.int64)

    @property
    def fp32_size_bits(self) -> int:
        """Weight size of the FP32 model in bits (32 bits per parameter)."""
        return int(self.num_params.sum()) * FP32_BITS

    @property
    def fp32_bops(self) -> float:
        """BOPs of the FP32 model: ``sum(macs) * 32 * 32``."""
        return float(self.macs.sum()) * FP32_BITS * FP32_BITS

    def size_matrix(self) -> np.ndarray:
        """``(L, K)`` weight size in bits of each layer under each option (int64)."""
        return np.outer(self.num_params, self.weight_bits)

    def bops_matrix(self) -> np.ndarray:
        """``(L, K)`` BOPs of each layer under each option."""
        return np.outer(self.macs, (self.weight_bits * self.activation_bits).astype(np.float64))

    def allowed_mask(self) -> np.ndarray:
        """``(L, K)`` bool: option allowed (finite sensitivity; for pinned layers only the pinned option)."""
        allowed = ~np.isnan(self.sensitivity)
        index = {name: i for i, name in enumerate(self.layer_names)}
        opt_index = {o: k for k, o in enumerate(self.options)}
        for layer, opt in self.pinned.items():
            if layer in index and opt in opt_index:
                row = np.zeros(self.num_options, dtype=bool)
                row[opt_index[opt]] = True
                allowed[index[layer]] = row
        return allowed

    def effective_sensitivity(self) -> np.ndarray:
        """Sensitivity with a pinned layer's ``nan`` at its pinned option replaced by 0."""
        sens = self.sensitivity.copy()
        allowed = self.allowed_mask()
        sens[allowed & np.isnan(sens)] = 0.0
        return sens

    # -- serialisation ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe representation (``nan`` -> ``None``)."""
        sens = [[None if math.isnan(v) else float(v) for v in row] for row in self.sensitivity.tolist()]
        return {
            "format_version": _FORMAT_VERSION,
            "layer_names": list(self.layer_names),
            "options": [o.to_dict() for o in self.options],
            "sensitivity": sens,
            "num_params": [int(v) for v in self.num_params.tolist()],
            "macs": [float(v) for v in self.macs.tolist()],
            "pinned": {name: opt.to_dict() for name, opt in self.pinned.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AllocationProblem:
        """Inverse of :meth:`to_dict`."""
        version = data.get("format_version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported AllocationProblem format_version {version!r}")
        sens = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in data["sensitivity"]], dtype=np.float64
        )
        num_layers = len(data["layer_names"])
        return cls(
            layer_names=list(data["layer_names"]),
            options=[BitOption.from_dict(o) for o in data["options"]],
            sensitivity=sens.reshape(num_layers, len(data["options"])),
            num_params=np.array(data["num_params"], dtype=np.int64),
            macs=np.array(data["macs"], dtype=np.float64),
            pinned={name: BitOption.from_dict(o) for name, o in data.get("pinned", {}).items()},
        )


@dataclass
class Allocation:
    """A chosen option per layer and its cost.

    Attributes:
        assignment: ``{layer_name: option}``, ordered like ``problem.layer_names``.
        predicted_criterion: Sum of the chosen sensitivities (original units).
        weight_bits_total: ``sum(num_params * weight_bits)``.
        bops: ``sum(macs * weight_bits * activation_bits)``.
        size_fraction: ``weight_bits_total / (32 * sum(num_params))``.
        solve_seconds: Wall time spent in the solver (0 for closed-form allocations).
        optimal: True when HiGHS proved optimality with ``mip_rel_gap=0`` (False after a time limit or with a
            positive ``mip_rel_gap``). HiGHS still applies its absolute gap (1e-6 on the normalised objective,
            i.e. about 1e-6 of the median per-layer sensitivity spread).
        mip_gap: Relative gap reported by HiGHS (None when no solver ran).
    """

    assignment: dict[str, BitOption]
    predicted_criterion: float
    weight_bits_total: int
    bops: float
    size_fraction: float
    solve_seconds: float
    optimal: bool = True
    mip_gap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe representation."""
        return {
            "assignment": {name: opt.to_dict() for name, opt in self.assignment.items()},
            "predicted_criterion": float(self.predicted_criterion),
            "weight_bits_total": int(self.weight_bits_total),
            "bops": float(self.bops),
            "size_fraction": float(self.size_fraction),
            "solve_seconds": float(self.solve_seconds),
            "optimal": bool(self.optimal),
            "mip_gap": None if self.mip_gap is None else float(self.mip_gap),
        }
