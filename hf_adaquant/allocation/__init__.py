"""Bit allocation: choose a precision per layer under size / BOPs budgets by integer programming.

``problem`` holds the types (options, problem, allocation), ``units`` the size/BOPs units and totals, ``presolve``
the exact reductions and ``solver`` the MILP (pure numpy/scipy; ``ilp`` re-exports the four); ``budget`` maps a
config to options, pins and budgets; ``sensitivity`` measures the per-layer, per-option criterion increases
(``criteria``: KL / MSE / task loss against the FP model; ``sensitivity_cache``: the fingerprinted JSON cache);
``pareto`` plots sweeps. The sweep itself quantizes, so it is a pipeline verb: :func:`hf_adaquant.sweep.pareto_sweep`.
"""

from .budget import (
    FLOAT_ACTIVATION_BITS,
    allocate_bits,
    allocation_to_layer_bits,
    bits_of_option,
    build_problem,
    candidate_options,
    check_budget,
    option_of_bits,
    policy_pins,
)
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
from .pareto import plot_bits_per_layer, plot_pareto
from .sensitivity import measure_sensitivity, sensitivity_fingerprint

__all__ = [
    "BOPS_UNITS",
    "FLOAT_ACTIVATION_BITS",
    "SIZE_UNITS",
    "Allocation",
    "AllocationProblem",
    "BitOption",
    "InfeasibleBudgetError",
    "allocate_bits",
    "allocation_to_layer_bits",
    "bits_of_option",
    "bops_of",
    "build_problem",
    "candidate_options",
    "check_budget",
    "measure_sensitivity",
    "option_of_bits",
    "plot_bits_per_layer",
    "plot_pareto",
    "policy_pins",
    "sensitivity_fingerprint",
    "size_of",
    "solve_allocation",
    "uniform_allocation",
]
