"""Bit allocation: choose a precision per layer under size / BOPs budgets by integer programming."""

from .ilp import (
    BOPS_UNITS,
    SIZE_UNITS,
    Allocation,
    AllocationProblem,
    BitOption,
    InfeasibleBudgetError,
    bops_of,
    size_of,
    solve_allocation,
    uniform_allocation,
)

__all__ = [
    "BOPS_UNITS",
    "SIZE_UNITS",
    "Allocation",
    "AllocationProblem",
    "BitOption",
    "InfeasibleBudgetError",
    "bops_of",
    "size_of",
    "solve_allocation",
    "uniform_allocation",
]
