"""Integer-programming bit allocation (multiple-choice knapsack solved with ``scipy.optimize.milp``).

Every layer ``l`` picks exactly one option ``k`` (a weight/activation bit-width pair). With binaries ``x[l, k]``::

    minimise    sum_{l,k} sensitivity[l, k] * x[l, k]
    subject to  sum_k x[l, k] = 1                                   for every layer l
                sum_{l,k} num_params[l] * wbits[k] * x[l, k] <= size budget     (optional)
                sum_{l,k} macs[l] * wbits[k] * abits[k] * x[l, k] <= BOPs budget (optional)

``sensitivity[l, k]`` is the increase of the calibration criterion when only layer ``l`` takes option ``k``;
``np.nan`` marks an option a layer may not take. Pinned layers are forced to one option. The solver runs HiGHS
with ``mip_rel_gap=0`` so the result is optimal (up to HiGHS tolerances), and is deterministic.

Two exact reductions run before HiGHS: options another option of the same layer beats in cost and every active
budget are dropped, and options whose Lagrangian reduced cost (LP duals) exceeds the gap between the LP bound and a
rounded-and-improved LP incumbent are dropped (they cannot appear in any solution better than the incumbent).
Both cut HiGHS' work several-fold on 500-layer problems without changing the optimum.

This module is pure numpy/scipy (no torch) so it can be used on cached sensitivity matrices.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

__all__ = [
    "Allocation",
    "AllocationProblem",
    "BitOption",
    "InfeasibleBudgetError",
    "SIZE_UNITS",
    "BOPS_UNITS",
    "bops_of",
    "size_of",
    "solve_allocation",
    "uniform_allocation",
]

logger = logging.getLogger(__name__)

SIZE_UNITS: tuple[str, ...] = ("fraction", "bits", "bytes")
BOPS_UNITS: tuple[str, ...] = ("fraction", "absolute")

_FP32_BITS = 32
_FORMAT_VERSION = 1
# Relative slack when comparing a (converted) budget with exact integer/float totals: absorbs the float error of
# unit conversions (e.g. a fraction copied back from an error message) without admitting a real violation.
_BUDGET_RTOL = 1e-12
_MAX_TIGHTEN_RETRIES = 3
# Largest number of option combinations tried on the LP's fractional layers to find an incumbent.
_MAX_ENUMERATION = 4096
_MAX_IMPROVE_STEPS = 200


# ----------------------------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------------------------


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


class InfeasibleBudgetError(ValueError):
    """No assignment satisfies the budget(s).

    Attributes:
        min_size_budget: Smallest feasible size budget on its own, in the caller's size unit (None if no size budget).
        min_bops_budget: Smallest feasible BOPs budget on its own, in the caller's BOPs unit (None if no BOPs budget).
        size_unit: Unit of ``min_size_budget``.
        bops_unit: Unit of ``min_bops_budget``.
    """

    def __init__(
        self,
        message: str,
        *,
        min_size_budget: float | None = None,
        min_bops_budget: float | None = None,
        size_unit: str | None = None,
        bops_unit: str | None = None,
    ) -> None:
        super().__init__(message)
        self.min_size_budget = min_size_budget
        self.min_bops_budget = min_bops_budget
        self.size_unit = size_unit
        self.bops_unit = bops_unit


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
        return int(self.num_params.sum()) * _FP32_BITS

    @property
    def fp32_bops(self) -> float:
        """BOPs of the FP32 model: ``sum(macs) * 32 * 32``."""
        return float(self.macs.sum()) * _FP32_BITS * _FP32_BITS

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


# ----------------------------------------------------------------------------------------------------------------
# Units and helpers
# ----------------------------------------------------------------------------------------------------------------


def _check_unit(unit: str, allowed: tuple[str, ...], what: str) -> None:
    if unit not in allowed:
        raise ValueError(f"unknown {what} unit {unit!r}; expected one of {list(allowed)}")


def _size_to_bits(problem: AllocationProblem, value: float, unit: str) -> float:
    _check_unit(unit, SIZE_UNITS, "size budget")
    if unit == "bits":
        return float(value)
    if unit == "bytes":
        return float(value) * 8.0
    if problem.fp32_size_bits == 0:
        raise ValueError("a size budget as a 'fraction' needs sum(num_params) > 0")
    return float(value) * problem.fp32_size_bits


def _bits_to_size(problem: AllocationProblem, bits: float, unit: str) -> float:
    if unit == "bits":
        return float(bits)
    if unit == "bytes":
        return float(bits) / 8.0
    return float(bits) / problem.fp32_size_bits


def _bops_to_absolute(problem: AllocationProblem, value: float, unit: str) -> float:
    _check_unit(unit, BOPS_UNITS, "BOPs budget")
    if unit == "absolute":
        return float(value)
    if problem.fp32_bops == 0:
        raise ValueError("a BOPs budget as a 'fraction' needs sum(macs) > 0")
    return float(value) * problem.fp32_bops


def _absolute_to_bops(problem: AllocationProblem, bops: float, unit: str) -> float:
    return float(bops) if unit == "absolute" else float(bops) / problem.fp32_bops


def _fmt(value: float) -> str:
    """Exact, copy-pasteable number: integers without a decimal point, floats in shortest round-trip form."""
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _assignment_indices(problem: AllocationProblem, assignment: Mapping[str, BitOption]) -> np.ndarray:
    missing = [n for n in problem.layer_names if n not in assignment]
    if missing:
        raise ValueError(f"assignment lacks layer(s) {missing}")
    names = set(problem.layer_names)
    unknown = [n for n in assignment if n not in names]
    if unknown:
        raise ValueError(f"assignment names unknown layer(s) {unknown}")
    opt_index = {o: k for k, o in enumerate(problem.options)}
    idx = np.empty(problem.num_layers, dtype=np.int64)
    for l, name in enumerate(problem.layer_names):
        opt = assignment[name]
        if opt not in opt_index:
            raise ValueError(f"layer {name!r} is assigned {opt!r}, which is not one of the options")
        idx[l] = opt_index[opt]
    return idx


def size_of(problem: AllocationProblem, assignment: Mapping[str, BitOption], unit: str = "bits") -> float:
    """Weight size of ``assignment`` in ``unit`` ("bits" (an int), "bytes" or "fraction" of the FP32 size)."""
    _check_unit(unit, SIZE_UNITS, "size")
    idx = _assignment_indices(problem, assignment)
    bits = int(problem.size_matrix()[np.arange(problem.num_layers), idx].sum())
    return bits if unit == "bits" else _bits_to_size(problem, bits, unit)


def bops_of(problem: AllocationProblem, assignment: Mapping[str, BitOption], unit: str = "absolute") -> float:
    """BOPs of ``assignment`` ("absolute" or "fraction" of the FP32 BOPs)."""
    _check_unit(unit, BOPS_UNITS, "BOPs")
    idx = _assignment_indices(problem, assignment)
    bops = float(problem.bops_matrix()[np.arange(problem.num_layers), idx].sum())
    return _absolute_to_bops(problem, bops, unit)


def _make_allocation(
    problem: AllocationProblem,
    idx: np.ndarray,
    *,
    solve_seconds: float,
    optimal: bool = True,
    mip_gap: float | None = None,
) -> Allocation:
    rows = np.arange(problem.num_layers)
    sens = problem.effective_sensitivity()[rows, idx]
    bits = int(problem.size_matrix()[rows, idx].sum())
    fp32 = problem.fp32_size_bits
    return Allocation(
        assignment={name: problem.options[k] for name, k in zip(problem.layer_names, idx.tolist())},
        predicted_criterion=float(sens.sum()),
        weight_bits_total=bits,
        bops=float(problem.bops_matrix()[rows, idx].sum()),
        size_fraction=bits / fp32 if fp32 else 0.0,
        solve_seconds=solve_seconds,
        optimal=optimal,
        mip_gap=mip_gap,
    )


def uniform_allocation(problem: AllocationProblem, option: BitOption) -> Allocation:
    """All layers at ``option`` (pinned layers keep their pin).

    Raises:
        ValueError: ``option`` is not one of ``problem.options`` or is disallowed (nan) for an unpinned layer.
    """
    problem.validate()
    opt_index = {o: k for k, o in enumerate(problem.options)}
    if option not in opt_index:
        raise ValueError(f"{option!r} is not one of the options {[o.label for o in problem.options]}")
    idx = np.full(problem.num_layers, opt_index[option], dtype=np.int64)
    for l, name in enumerate(problem.layer_names):
        if name in problem.pinned:
            idx[l] = opt_index[problem.pinned[name]]
    allowed = problem.allowed_mask()
    bad = [problem.layer_names[l] for l in range(problem.num_layers) if not allowed[l, idx[l]]]
    if bad:
        raise ValueError(f"option {option.label} is not allowed (nan sensitivity) for layer(s) {bad}; pin them")
    return _make_allocation(problem, idx, solve_seconds=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Solver
# ----------------------------------------------------------------------------------------------------------------


def _scaled_rows(rows: list[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, float]]:
    """Divide each budget row by its cap so coefficients sum to O(1) and the right-hand side is 1."""
    scaled = []
    for coeffs, cap in rows:
        scale = cap if cap > 0 else max(float(np.abs(coeffs).max()), 1.0)
        scaled.append((coeffs / scale, cap / scale))
    return scaled


def _choice_matrix(num_layers: int, num_options: int) -> sp.csr_array:
    """Sparse ``(L, L*K)`` matrix with ``sum_k x[l, k]`` in row ``l``."""
    size = num_layers * num_options
    return sp.csr_array(
        (np.ones(size), np.arange(size), np.arange(0, size + 1, num_options)), shape=(num_layers, size)
    )


def _budget_matrix(allowed: np.ndarray, scaled: list[tuple[np.ndarray, float]]) -> tuple[sp.csr_array, np.ndarray]:
    rows = np.stack([np.where(allowed, coeffs, 0.0).ravel() for coeffs, _ in scaled])
    return sp.csr_array(rows), np.array([cap for _, cap in scaled])


def _lagrangian_reduce(cost: np.ndarray, allowed: np.ndarray, scaled: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Exact reduced-cost fixing from the LP relaxation, done before the MILP to shrink what HiGHS must search.

    For multipliers ``lam >= 0`` of the budget rows, every feasible assignment ``k_l`` satisfies
    ``obj >= LB + sum_l red[l, k_l]`` with ``red >= 0`` the per-layer Lagrangian reduced costs (weak duality). An
    incumbent of objective ``inc`` (the LP solution with its few fractional layers enumerated) therefore rules out
    every option with ``red > inc - LB``: no assignment using it beats the incumbent. ``lam`` comes from the LP duals
    but any non-negative value keeps the argument valid. Returns ``allowed`` unchanged when no incumbent is found.
    """
    num_layers, num_options = allowed.shape
    a_ub, b_ub = _budget_matrix(allowed, scaled)
    bounds = np.column_stack([np.zeros(allowed.size), allowed.ravel().astype(np.float64)])
    lp = linprog(
        cost.ravel(),
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=_choice_matrix(num_layers, num_options),
        b_eq=np.ones(num_layers),
        bounds=bounds,
        method="highs",
    )
    if lp.status != 0 or lp.x is None:
        return allowed
    lam = np.maximum(0.0, -np.asarray(lp.ineqlin.marginals, dtype=np.float64))
    x = np.where(allowed, lp.x.reshape(allowed.shape), -np.inf)
    base = np.argmax(x, axis=1)
    frac = np.flatnonzero(x.max(axis=1) < 1.0 - 1e-6)

    # Incumbent: LP choice on integral layers, best feasible combination on the (few) fractional ones.
    choices = [np.flatnonzero(allowed[l]) for l in frac]
    if math.prod(len(c) for c in choices) > _MAX_ENUMERATION:
        return allowed
    combo_list = list(itertools.product(*choices))
    combos = np.array(combo_list, dtype=np.int64).reshape(len(combo_list), len(frac))
    rows = np.arange(num_layers)
    fixed = np.ones(num_layers, dtype=bool)
    fixed[frac] = False
    feasible = np.ones(len(combos), dtype=bool)
    for coeffs, cap in scaled:
        totals = coeffs[rows[fixed], base[fixed]].sum() + coeffs[frac[None, :], combos].sum(axis=1)
        feasible &= totals <= cap
    if not feasible.any():
        return allowed
    objective = cost[rows[fixed], base[fixed]].sum() + cost[frac[None, :], combos].sum(axis=1)
    choice = base.copy()
    best_combo = int(np.flatnonzero(feasible)[np.argmin(objective[feasible])])
    choice[frac] = combos[best_combo]
    incumbent = _improve(cost, allowed, scaled, choice)

    lagrangian = cost + sum(lam_r * coeffs for lam_r, (coeffs, _) in zip(lam, scaled))
    lagrangian = np.where(allowed, lagrangian, np.inf)
    best = lagrangian.min(axis=1)
    lower = float(best.sum() - sum(lam_r * cap for lam_r, (_, cap) in zip(lam, scaled)))
    reduced = lagrangian - best[:, None]
    slack = incumbent - lower + 1e-6 + 1e-9 * (abs(incumbent) + float(lam.sum()))
    kept = allowed & (reduced <= slack)
    logger.debug(
        "reduced-cost fixing: kept %d of %d columns (LP bound %.9g, incumbent %.9g)",
        int(kept.sum()),
        int(allowed.sum()),
        lower,
        incumbent,
    )
    return kept


def _improve(
    cost: np.ndarray, allowed: np.ndarray, scaled: list[tuple[np.ndarray, float]], choice: np.ndarray
) -> float:
    """Greedy 1-opt: repeatedly apply the single-layer change that lowers the cost most while staying within budget.

    ``choice`` (feasible) is updated in place; returns its cost.
    """
    rows = np.arange(allowed.shape[0])
    totals = [float(coeffs[rows, choice].sum()) for coeffs, _ in scaled]
    masked = np.where(allowed, cost, np.inf)
    for _ in range(_MAX_IMPROVE_STEPS):
        delta = masked - masked[rows, choice][:, None]
        ok = delta < 0
        for (coeffs, cap), total in zip(scaled, totals):
            ok &= total + (coeffs - coeffs[rows, choice][:, None]) <= cap
        if not ok.any():
            break
        flat = int(np.argmin(np.where(ok, delta, np.inf)))
        layer, option = divmod(flat, allowed.shape[1])
        for r, (coeffs, _) in enumerate(scaled):
            totals[r] += float(coeffs[layer, option] - coeffs[layer, choice[layer]])
        choice[layer] = option
    return float(cost[rows, choice].sum())


def _run_milp(
    cost: np.ndarray,
    allowed: np.ndarray,
    rows: list[tuple[np.ndarray, float]],
    time_limit: float | None,
    mip_rel_gap: float,
) -> Any:
    """Solve ``min cost.x`` over one-hot rows of ``allowed`` with extra ``coeffs.x <= cap`` rows (scaled to O(1))."""
    num_layers, num_options = allowed.shape
    scaled = _scaled_rows(rows)
    allowed = _lagrangian_reduce(cost, allowed, scaled)
    a_budget, b_budget = _budget_matrix(allowed, scaled)
    a_mat = sp.vstack([_choice_matrix(num_layers, num_options), a_budget], format="csc")
    lb = np.concatenate([np.ones(num_layers), np.full(len(scaled), -np.inf)])
    ub = np.concatenate([np.ones(num_layers), b_budget])
    bounds = Bounds(np.zeros(allowed.size), allowed.ravel().astype(np.float64))
    options: dict[str, Any] = {"disp": False, "presolve": True, "mip_rel_gap": float(mip_rel_gap)}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    return milp(
        cost.ravel(),
        integrality=np.ones(allowed.size, dtype=np.int64),
        bounds=bounds,
        constraints=LinearConstraint(a_mat, lb, ub),
        options=options,
    )


def _normalised_cost(sens: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Solver costs: each layer's allowed costs shifted to start at 0, scaled so the median layer spread is 1.

    The per-layer shift is a constant (one option per layer) and does not move the optimum. Scaling by the median
    (not the maximum) spread keeps typical costs O(1) even when sensitivities span orders of magnitude, so HiGHS's
    absolute tolerances (~1e-6) stay negligible relative to the objective.
    """
    cost = np.where(allowed, sens, np.inf)
    cost = cost - cost.min(axis=1, keepdims=True)
    cost = np.where(allowed, cost, 0.0)
    spread = cost.max(axis=1)
    positive = spread[spread > 0]
    return cost / float(np.median(positive)) if positive.size else cost


def _undominated(criteria: list[np.ndarray], allowed: np.ndarray) -> np.ndarray:
    """Drop options another allowed option of the same layer beats in every criterion (exact reduction).

    Option ``k`` of layer ``l`` is removed if some allowed ``j`` has ``criteria[c][l, j] <= criteria[c][l, k]`` for
    all ``c`` with at least one strict inequality, or is identical in all criteria with ``j < k`` (deterministic
    tie-break). Swapping ``k`` for ``j`` never worsens the objective nor any budget, so the optimum is kept.
    """
    num_options = allowed.shape[1]
    weak = allowed[:, :, None] & allowed[:, None, :]  # [l, j, k]: j and k both allowed
    equal = weak.copy()
    for values in criteria:
        weak &= values[:, :, None] <= values[:, None, :]
        equal &= values[:, :, None] == values[:, None, :]
    first = np.arange(num_options)[:, None] < np.arange(num_options)[None, :]
    dominated = ((weak & ~equal) | (equal & first[None])).any(axis=1)
    return allowed & ~dominated


def _solve_exact(
    cost: np.ndarray,
    allowed: np.ndarray,
    exact_rows: list[tuple[np.ndarray, float]],
    time_limit: float | None = None,
    mip_rel_gap: float = 0.0,
) -> tuple[Any, np.ndarray | None]:
    """Solve, then re-check budgets exactly on the argmax assignment; tighten and re-solve on tolerance slips."""
    caps = [cap for _, cap in exact_rows]
    solver_caps = list(caps)
    rows_idx = np.arange(allowed.shape[0])
    for attempt in range(_MAX_TIGHTEN_RETRIES + 1):
        rows = [(coeffs, cap) for (coeffs, _), cap in zip(exact_rows, solver_caps)]
        res = _run_milp(cost, allowed, rows, time_limit, mip_rel_gap)
        if res.x is None:
            return res, None
        x = np.where(allowed, np.asarray(res.x).reshape(allowed.shape), -np.inf)
        idx = np.argmax(x, axis=1)
        slipped = False
        for j, (coeffs, cap) in enumerate(exact_rows):
            total = float(coeffs[rows_idx, idx].sum())
            if total > cap:
                slipped = True
                excess = total - cap
                solver_caps[j] = solver_caps[j] - excess - 1e-9 * max(abs(cap), 1.0)
                logger.warning(
                    "HiGHS solution exceeds budget row %d by %.3g (tolerance); re-solving with a tighter cap "
                    "(attempt %d)",
                    j,
                    excess,
                    attempt + 1,
                )
        if not slipped:
            return res, idx
    raise RuntimeError("could not obtain an assignment within the budget after tightening; please report this")


def _min_alone(matrix: np.ndarray, allowed: np.ndarray) -> float:
    return float(np.where(allowed, matrix, np.inf).min(axis=1).sum())


def _min_subject_to(
    objective: np.ndarray, allowed: np.ndarray, constraint: tuple[np.ndarray, float]
) -> float | None:
    """Smallest ``sum objective[l, k_l]`` subject to one budget row (for the infeasibility message)."""
    top = float(np.abs(objective).max()) or 1.0
    res, idx = _solve_exact(objective / top, allowed, [constraint])
    if idx is None:
        return None
    return float(objective[np.arange(allowed.shape[0]), idx].sum())


def solve_allocation(
    problem: AllocationProblem,
    *,
    size_budget: float | None = None,
    size_budget_unit: str = "fraction",
    bops_budget: float | None = None,
    bops_budget_unit: str = "fraction",
    time_limit: float | None = None,
    mip_rel_gap: float = 0.0,
) -> Allocation:
    """Choose one option per layer minimising the summed sensitivity under size and/or BOPs budgets.

    Args:
        problem: The allocation problem.
        size_budget: Weight-size budget, in ``size_budget_unit``.
        size_budget_unit: "fraction" (of the FP32 weight size, 32 bits/param), "bits" or "bytes".
        bops_budget: BOPs budget (``sum macs * wbits * abits``), in ``bops_budget_unit``.
        bops_budget_unit: "fraction" (of the FP32 BOPs, ``sum macs * 32 * 32``) or "absolute".
        time_limit: Optional HiGHS time limit in seconds; the best incumbent is returned (``optimal=False``) if the
            limit stops the search.
        mip_rel_gap: HiGHS relative gap; the default 0 proves optimality (a positive value trades it for speed).

    Returns:
        The optimal :class:`Allocation`.

    Raises:
        ValueError: No budget given, unknown unit, non-finite budget, or an invalid problem.
        InfeasibleBudgetError: No assignment fits; the message states the smallest feasible budget(s).
        RuntimeError: The solver failed or found no solution within ``time_limit``.
    """
    if size_budget is None and bops_budget is None:
        raise ValueError("give at least one of size_budget and bops_budget")
    _check_unit(size_budget_unit, SIZE_UNITS, "size budget")
    _check_unit(bops_budget_unit, BOPS_UNITS, "BOPs budget")
    for value, name in ((size_budget, "size_budget"), (bops_budget, "bops_budget")):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0, got {time_limit}")
    if not 0.0 <= mip_rel_gap < 1.0:
        raise ValueError(f"mip_rel_gap must be in [0, 1), got {mip_rel_gap}")
    problem.validate()

    allowed = problem.allowed_mask()
    sizes = problem.size_matrix()
    bops = problem.bops_matrix()

    # Budgets in exact units (bits / absolute BOPs) with a tiny relative slack for unit-conversion round-off.
    exact_rows: list[tuple[np.ndarray, float]] = []
    size_cap = bops_cap = None
    if size_budget is not None:
        bits = _size_to_bits(problem, size_budget, size_budget_unit)
        size_cap = float(math.floor(bits + _BUDGET_RTOL * abs(bits)))
        exact_rows.append((sizes.astype(np.float64), size_cap))
    if bops_budget is not None:
        absolute = _bops_to_absolute(problem, bops_budget, bops_budget_unit)
        bops_cap = absolute + _BUDGET_RTOL * abs(absolute)
        exact_rows.append((bops, bops_cap))

    # Each budget alone: closed-form minimum.
    min_bits = _min_alone(sizes.astype(np.float64), allowed)
    min_bops = _min_alone(bops, allowed)
    min_size_user = _bits_to_size(problem, min_bits, size_budget_unit) if size_budget is not None else None
    min_bops_user = _absolute_to_bops(problem, min_bops, bops_budget_unit) if bops_budget is not None else None
    size_short = size_cap is not None and min_bits > size_cap
    bops_short = bops_cap is not None and min_bops > bops_cap
    if size_short or bops_short:
        parts = []
        if size_budget is not None:
            parts.append(
                f"size budget {_fmt(size_budget)} {size_budget_unit}: smallest feasible is "
                f"{_fmt(min_size_user)} {size_budget_unit}" + ("" if size_short else " (met)")
            )
        if bops_budget is not None:
            parts.append(
                f"BOPs budget {_fmt(bops_budget)} {bops_budget_unit}: smallest feasible is "
                f"{_fmt(min_bops_user)} {bops_budget_unit}" + ("" if bops_short else " (met)")
            )
        raise InfeasibleBudgetError(
            "budget infeasible; " + "; ".join(parts),
            min_size_budget=min_size_user,
            min_bops_budget=min_bops_user,
            size_unit=size_budget_unit if size_budget is not None else None,
            bops_unit=bops_budget_unit if bops_budget is not None else None,
        )

    start = time.perf_counter()
    sens = problem.effective_sensitivity()
    candidates = _undominated([np.where(allowed, sens, 0.0)] + [coeffs for coeffs, _ in exact_rows], allowed)
    cost = _normalised_cost(sens, candidates)
    res, idx = _solve_exact(cost, candidates, exact_rows, time_limit, mip_rel_gap)
    seconds = time.perf_counter() - start

    if idx is None:
        if res.status == 2:
            # Both budgets are met alone but not together (only possible with two budgets).
            assert size_cap is not None and bops_cap is not None
            need_bits = _min_subject_to(sizes.astype(np.float64), allowed, (bops, bops_cap))
            need_bops = _min_subject_to(bops, allowed, (sizes.astype(np.float64), size_cap))
            need_size_user = None if need_bits is None else _bits_to_size(problem, need_bits, size_budget_unit)
            need_bops_user = None if need_bops is None else _absolute_to_bops(problem, need_bops, bops_budget_unit)
            raise InfeasibleBudgetError(
                f"budgets infeasible together: size budget {_fmt(size_budget)} {size_budget_unit} and BOPs budget "
                f"{_fmt(bops_budget)} {bops_budget_unit}. Alone, the smallest feasible size budget is "
                f"{_fmt(min_size_user)} {size_budget_unit} and the smallest feasible BOPs budget is "
                f"{_fmt(min_bops_user)} {bops_budget_unit}; keeping the BOPs budget needs a size budget of "
                f"{_fmt(need_size_user) if need_size_user is not None else 'n/a'} {size_budget_unit}, keeping the "
                f"size budget needs a BOPs budget of "
                f"{_fmt(need_bops_user) if need_bops_user is not None else 'n/a'} {bops_budget_unit}",
                min_size_budget=min_size_user,
                min_bops_budget=min_bops_user,
                size_unit=size_budget_unit,
                bops_unit=bops_budget_unit,
            )
        if res.status == 1:
            raise RuntimeError(f"no feasible allocation found within time_limit={time_limit} s ({res.message})")
        raise RuntimeError(f"MILP solver failed: status {res.status}: {res.message}")

    optimal = res.status == 0 and mip_rel_gap == 0.0
    if res.status != 0:
        logger.warning("time limit reached: returning the best incumbent (gap %s)", res.mip_gap)
    mip_gap = None if res.mip_gap is None else float(res.mip_gap)
    alloc = _make_allocation(problem, idx, solve_seconds=seconds, optimal=optimal, mip_gap=mip_gap)
    logger.info(
        "bit allocation: L=%d K=%d size=%.4f of fp32, bops=%.4g, criterion=%.6g, %.3f s%s",
        problem.num_layers,
        problem.num_options,
        alloc.size_fraction,
        alloc.bops,
        alloc.predicted_criterion,
        seconds,
        "" if optimal else " (not proven optimal)",
    )
    return alloc
