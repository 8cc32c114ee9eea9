"""Integer-programming bit allocation (multiple-choice knapsack solved with ``scipy.optimize.milp``).

With binaries ``x[l, k]`` (layer ``l`` takes option ``k``)::

    minimise    sum_{l,k} sensitivity[l, k] * x[l, k]
    subject to  sum_k x[l, k] = 1                                   for every layer l
                sum_{l,k} num_params[l] * wbits[k] * x[l, k] <= size budget     (optional)
                sum_{l,k} macs[l] * wbits[k] * abits[k] * x[l, k] <= BOPs budget (optional)

Pinned layers are forced to one option. The solver runs HiGHS with ``mip_rel_gap=0`` so the result is optimal (up to
HiGHS tolerances), and is deterministic. The exact reductions of :mod:`.presolve` run first (``presolve=True``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from .presolve import budget_matrix, choice_matrix, drop_dominated, normalised_cost, reduced_cost_fixing, scaled_rows
from .problem import Allocation, AllocationProblem
from .units import (BOPS_UNITS, SIZE_UNITS, absolute_to_bops, bits_to_size, bops_to_absolute, check_unit,
                    format_number, make_allocation, size_to_bits)

__all__ = ["InfeasibleBudgetError", "solve_allocation"]

logger = logging.getLogger(__name__)

# Relative slack when comparing a (converted) budget with exact integer/float totals: absorbs the float error of
# unit conversions (e.g. a fraction copied back from an error message) without admitting a real violation.
_BUDGET_RTOL = 1e-12
_MAX_TIGHTEN_RETRIES = 3


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


def _run_milp(
    cost: np.ndarray,
    allowed: np.ndarray,
    rows: list[tuple[np.ndarray, float]],
    time_limit: float | None,
    mip_rel_gap: float,
    presolve: bool = True,
) -> Any:
    """Solve ``min cost.x`` over one-hot rows of ``allowed`` with extra ``coeffs.x <= cap`` rows (scaled to O(1))."""
    num_layers, num_options = allowed.shape
    scaled = scaled_rows(rows)
    if presolve:
        allowed = reduced_cost_fixing(cost, allowed, scaled)
    a_budget, b_budget = budget_matrix(allowed, scaled)
    a_mat = sp.vstack([choice_matrix(num_layers, num_options), a_budget], format="csc")
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


def _solve_exact(
    cost: np.ndarray,
    allowed: np.ndarray,
    exact_rows: list[tuple[np.ndarray, float]],
    time_limit: float | None = None,
    mip_rel_gap: float = 0.0,
    presolve: bool = True,
) -> tuple[Any, np.ndarray | None]:
    """Solve, then re-check budgets exactly on the argmax assignment; tighten and re-solve on tolerance slips."""
    caps = [cap for _, cap in exact_rows]
    solver_caps = list(caps)
    rows_idx = np.arange(allowed.shape[0])
    for attempt in range(_MAX_TIGHTEN_RETRIES + 1):
        rows = [(coeffs, cap) for (coeffs, _), cap in zip(exact_rows, solver_caps)]
        res = _run_milp(cost, allowed, rows, time_limit, mip_rel_gap, presolve)
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
    objective: np.ndarray, allowed: np.ndarray, constraint: tuple[np.ndarray, float], presolve: bool = True
) -> float | None:
    """Smallest ``sum objective[l, k_l]`` subject to one budget row (for the infeasibility message)."""
    top = float(np.abs(objective).max()) or 1.0
    res, idx = _solve_exact(objective / top, allowed, [constraint], presolve=presolve)
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
    presolve: bool = True,
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
        presolve: run the exact reductions of :mod:`hf_adaquant.allocation.presolve` before HiGHS (same optimum;
            off only to measure what they save).

    Returns:
        The optimal :class:`Allocation`.

    Raises:
        ValueError: No budget given, unknown unit, non-finite budget, or an invalid problem.
        InfeasibleBudgetError: No assignment fits; the message states the smallest feasible budget(s).
        RuntimeError: The solver failed or found no solution within ``time_limit``.
    """
    if size_budget is None and bops_budget is None:
        raise ValueError("give at least one of size_budget and bops_budget")
    check_unit(size_budget_unit, SIZE_UNITS, "size budget")
    check_unit(bops_budget_unit, BOPS_UNITS, "BOPs budget")
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
        bits = size_to_bits(problem, size_budget, size_budget_unit)
        size_cap = float(math.floor(bits + _BUDGET_RTOL * abs(bits)))
        exact_rows.append((sizes.astype(np.float64), size_cap))
    if bops_budget is not None:
        absolute = bops_to_absolute(problem, bops_budget, bops_budget_unit)
        bops_cap = absolute + _BUDGET_RTOL * abs(absolute)
        exact_rows.append((bops, bops_cap))

    # Each budget alone: closed-form minimum.
    min_bits = _min_alone(sizes.astype(np.float64), allowed)
    min_bops = _min_alone(bops, allowed)
    min_size_user = bits_to_size(problem, min_bits, size_budget_unit) if size_budget is not None else None
    min_bops_user = absolute_to_bops(problem, min_bops, bops_budget_unit) if bops_budget is not None else None
    size_short = size_cap is not None and min_bits > size_cap
    bops_short = bops_cap is not None and min_bops > bops_cap
    if size_short or bops_short:
        parts = []
        if size_budget is not None:
            parts.append(
                f"size budget {format_number(size_budget)} {size_budget_unit}: smallest feasible is "
                f"{format_number(min_size_user)} {size_budget_unit}" + ("" if size_short else " (met)")
            )
        if bops_budget is not None:
            parts.append(
                f"BOPs budget {format_number(bops_budget)} {bops_budget_unit}: smallest feasible is "
                f"{format_number(min_bops_user)} {bops_budget_unit}" + ("" if bops_short else " (met)")
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
    candidates = allowed
    if presolve:
        candidates = drop_dominated([np.where(allowed, sens, 0.0)] + [coeffs for coeffs, _ in exact_rows], allowed)
    cost = normalised_cost(sens, candidates)
    res, idx = _solve_exact(cost, candidates, exact_rows, time_limit, mip_rel_gap, presolve)
    seconds = time.perf_counter() - start

    if idx is None:
        if res.status == 2:
            # Both budgets are met alone but not together (only possible with two budgets).
            assert size_cap is not None and bops_cap is not None
            need_bits = _min_subject_to(sizes.astype(np.float64), allowed, (bops, bops_cap), presolve)
            need_bops = _min_subject_to(bops, allowed, (sizes.astype(np.float64), size_cap), presolve)
            need_size_user = None if need_bits is None else bits_to_size(problem, need_bits, size_budget_unit)
            need_bops_user = None if need_bops is None else absolute_to_bops(problem, need_bops, bops_budget_unit)
            raise InfeasibleBudgetError(
                f"budgets infeasible together: size budget {format_number(size_budget)} {size_budget_unit} and BOPs budget "
                f"{format_number(bops_budget)} {bops_budget_unit}. Alone, the smallest feasible size budget is "
                f"{format_number(min_size_user)} {size_budget_unit} and the smallest feasible BOPs budget is "
                f"{format_number(min_bops_user)} {bops_budget_unit}; keeping the BOPs budget needs a size budget of "
                f"{format_number(need_size_user) if need_size_user is not None else 'n/a'} {size_budget_unit}, keeping the "
                f"size budget needs a BOPs budget of "
                f"{format_number(need_bops_user) if need_bops_user is not None else 'n/a'} {bops_budget_unit}",
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
    alloc = make_allocation(problem, idx, solve_seconds=seconds, optimal=optimal, mip_gap=mip_gap)
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
