"""Exact reductions run before the MILP (the "presolve"): they drop options that cannot be in an optimum.

* :func:`drop_dominated`: an option another option of the same layer beats (or ties) in cost and in every active
  budget is dropped;
* :func:`reduced_cost_fixing`: options whose Lagrangian reduced cost (LP duals) exceeds the gap between the LP
  bound and a rounded-and-improved LP incumbent are dropped (no solution using them beats the incumbent).

Both keep the optimum; whether they pay is measured in BENCHMARKS.md (``scripts/bench_ilp.py --compare-presolve``).
Budget rows come scaled by :func:`scaled_rows` (``coeffs / cap``, right-hand side 1).
"""

from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linprog

__all__ = ["budget_matrix", "choice_matrix", "drop_dominated", "improve_greedily", "normalised_cost",
           "reduced_cost_fixing", "scaled_rows"]

logger = logging.getLogger(__name__)

# Largest number of option combinations tried on the LP's fractional layers to find an incumbent.
_MAX_ENUMERATION = 4096
_MAX_IMPROVE_STEPS = 200


def scaled_rows(rows: list[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, float]]:
    """Divide each budget row by its cap so coefficients sum to O(1) and the right-hand side is 1."""
    scaled = []
    for coeffs, cap in rows:
        scale = cap if cap > 0 else max(float(np.abs(coeffs).max()), 1.0)
        scaled.append((coeffs / scale, cap / scale))
    return scaled


def choice_matrix(num_layers: int, num_options: int) -> sp.csr_array:
    """Sparse ``(L, L*K)`` matrix with ``sum_k x[l, k]`` in row ``l``."""
    size = num_layers * num_options
    return sp.csr_array(
        (np.ones(size), np.arange(size), np.arange(0, size + 1, num_options)), shape=(num_layers, size)
    )


def budget_matrix(allowed: np.ndarray, scaled: list[tuple[np.ndarray, float]]) -> tuple[sp.csr_array, np.ndarray]:
    """Sparse budget rows over the flattened ``x[l, k]`` (disallowed columns zeroed) and their caps."""
    rows = np.stack([np.where(allowed, coeffs, 0.0).ravel() for coeffs, _ in scaled])
    return sp.csr_array(rows), np.array([cap for _, cap in scaled])


def reduced_cost_fixing(cost: np.ndarray, allowed: np.ndarray, scaled: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Exact reduced-cost fixing from the LP relaxation, done before the MILP to shrink what HiGHS must search.

    For multipliers ``lam >= 0`` of the budget rows, every feasible assignment ``k_l`` satisfies
    ``obj >= LB + sum_l red[l, k_l]`` with ``red >= 0`` the per-layer Lagrangian reduced costs (weak duality). An
    incumbent of objective ``inc`` (the LP solution with its few fractional layers enumerated) therefore rules out
    every option with ``red > inc - LB``: no assignment using it beats the incumbent. ``lam`` comes from the LP duals
    but any non-negative value keeps the argument valid. Returns ``allowed`` unchanged when no incumbent is found.
    """
    num_layers, num_options = allowed.shape
    a_ub, b_ub = budget_matrix(allowed, scaled)
    bounds = np.column_stack([np.zeros(allowed.size), allowed.ravel().astype(np.float64)])
    lp = linprog(
        cost.ravel(),
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=choice_matrix(num_layers, num_options),
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
    incumbent = improve_greedily(cost, allowed, scaled, choice)

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


def improve_greedily(
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


def normalised_cost(sens: np.ndarray, allowed: np.ndarray) -> np.ndarray:
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


def drop_dominated(criteria: list[np.ndarray], allowed: np.ndarray) -> np.ndarray:
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
