"""Integer-programming bit allocation: the public names of ``problem``, ``units`` and ``solver`` in one place.

The allocation code is split by concern: :mod:`.problem` (types), :mod:`.units` (budget units, totals),
:mod:`.presolve` (exact reductions) and :mod:`.solver` (the HiGHS MILP). Pure numpy/scipy (no torch).
"""

from __future__ import annotations

from .problem import Allocation, AllocationProblem, BitOption
from .solver import InfeasibleBudgetError, solve_allocation
from .units import BOPS_UNITS, SIZE_UNITS, bops_of, size_of, uniform_allocation

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
