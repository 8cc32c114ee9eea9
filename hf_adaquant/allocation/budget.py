"""From an :class:`AdaQuantConfig` to an allocation problem and back: options, pins, budgets, ``layer_bits``.

Conventions:
    * The per-layer options are ``candidate_weight_bits x candidate_activation_bits``. When the config keeps
      activations in float (``activation_bits=None``) the activation candidates are ignored and every option has
      ``activation_bits = FLOAT_ACTIVATION_BITS`` (32): a float input, which is also what BOPs count for it.
    * Pins: the first and last quantized layers at ``first_last_bits`` (weights and activations; activations stay
      float in weight-only mode) when that policy is on, then ``config.pinned_layers`` (which wins). A pinned
      option outside the candidates is appended to the options, disallowed (``nan``) for every other layer.
    * Sizes count the weights of the quantized layers only (``num_params * weight_bits``); a "fraction" budget is
      relative to those weights in FP32 (32 bits each), as in :mod:`hf_adaquant.allocation.ilp`.

This module needs no model: :func:`build_problem` works from ``LayerInfo`` records, so a budget can be checked
before any sensitivity is measured (:func:`check_budget`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..config import AdaQuantConfig
from ..prepare import LayerInfo
from .ilp import Allocation, AllocationProblem, BitOption, solve_allocation

__all__ = [
    "FLOAT_ACTIVATION_BITS",
    "allocate_bits",
    "allocated_config",
    "allocation_record",
    "allocation_to_layer_bits",
    "bits_of_option",
    "budget_fields",
    "build_problem",
    "candidate_options",
    "check_budget",
    "option_of_bits",
    "policy_pins",
]

logger = logging.getLogger(__name__)

FLOAT_ACTIVATION_BITS = 32
"""``BitOption.activation_bits`` value meaning "input activations stay in float" (``activation_bits=None``)."""


def option_of_bits(weight_bits: int, activation_bits: int | None) -> BitOption:
    """``BitOption`` for a ``(w, a)`` pair as used in configs (``a=None`` -> ``FLOAT_ACTIVATION_BITS``)."""
    return BitOption(int(weight_bits), FLOAT_ACTIVATION_BITS if activation_bits is None else int(activation_bits))


def bits_of_option(option: BitOption) -> tuple[int, int | None]:
    """Inverse of :func:`option_of_bits`: ``(weight_bits, activation_bits or None)``."""
    abits = None if option.activation_bits >= FLOAT_ACTIVATION_BITS else option.activation_bits
    return option.weight_bits, abits


def candidate_options(config: AdaQuantConfig) -> list[BitOption]:
    """The per-layer options of ``config`` in a stable order (weight bits major), duplicates removed."""
    wbits = sorted(set(config.candidate_weight_bits))
    abits: list[int | None] = (
        [None] if config.activation_bits is None else sorted(set(config.candidate_activation_bits)))
    return [option_of_bits(w, a) for w in wbits for a in abits]


def policy_pins(layer_names: Sequence[str], config: AdaQuantConfig) -> dict[str, BitOption]:
    """Layers whose option the config fixes: first/last at ``first_last_bits``, then ``pinned_layers``.

    Raises:
        ValueError: ``pinned_layers`` names a layer that is not quantized.
    """
    pins: dict[str, BitOption] = {}
    if config.first_last_bits is not None and layer_names:
        flb = config.first_last_bits
        abits = None if config.activation_bits is None else flb
        for name in (layer_names[0], layer_names[-1]):
            pins[name] = option_of_bits(flb, abits)
    known = set(layer_names)
    unknown = [n for n in config.pinned_layers if n not in known]
    if unknown:
        raise ValueError(f"pinned_layers names {unknown}, which are not quantized layers; "
                         f"quantized layers: {list(layer_names)}")
    for name, (wbits, abits) in config.pinned_layers.items():
        pins[name] = option_of_bits(wbits, abits)
    return pins


def build_problem(
    layers: Sequence[LayerInfo], config: AdaQuantConfig, sensitivity: np.ndarray | None = None
) -> AllocationProblem:
    """The allocation problem for ``layers`` (the quantized layers, in execution order) under ``config``.

    Args:
        layers: ``LayerInfo`` records (``name``, ``num_params``, ``macs``) of the layers to allocate.
        config: gives the options (candidates) and the pins.
        sensitivity: ``(L, K)`` matrix over :func:`candidate_options` plus the appended pin-only options, or
            None for a placeholder (0 for allowed options): enough to check budgets.

    Returns:
        The problem; pinned layers have ``nan`` everywhere (their pinned option is a constant, counted as 0).
    """
    names = [layer.name for layer in layers]
    pins = policy_pins(names, config)
    options = candidate_options(config)
    options += [opt for opt in dict.fromkeys(pins.values()) if opt not in options]
    num_candidates = len(candidate_options(config))
    if sensitivity is None:
        sensitivity = np.full((len(names), len(options)), np.nan)
        sensitivity[:, :num_candidates] = 0.0
        for l, name in enumerate(names):
            if name in pins:
                sensitivity[l] = np.nan
    return AllocationProblem(
        layer_names=names,
        options=options,
        sensitivity=sensitivity,
        num_params=np.array([layer.num_params for layer in layers], dtype=np.int64),
        macs=np.array([layer.macs for layer in layers], dtype=np.float64),
        pinned=pins,
    )


def _budget_kwargs(config: AdaQuantConfig) -> dict[str, Any]:
    if not config.has_budget:
        raise ValueError("bit allocation needs a budget: set size_budget and/or bops_budget in the config")
    return dict(size_budget=config.size_budget, size_budget_unit=config.size_budget_unit,
                bops_budget=config.bops_budget, bops_budget_unit=config.bops_budget_unit)


def check_budget(problem: AllocationProblem, config: AdaQuantConfig) -> None:
    """Raise :class:`InfeasibleBudgetError` now if no assignment fits the config's budgets.

    Only sizes and BOPs matter, so this runs on a placeholder problem before any sensitivity is measured; the error
    states the smallest feasible budget(s).
    """
    placeholder = AllocationProblem(
        layer_names=problem.layer_names, options=problem.options,
        sensitivity=np.where(np.isnan(problem.sensitivity), np.nan, 0.0),
        num_params=problem.num_params, macs=problem.macs, pinned=problem.pinned)
    solver_logger = logging.getLogger(solve_allocation.__module__)
    level = solver_logger.level
    solver_logger.setLevel(max(level, logging.WARNING))  # no "bit allocation: ..." line for the placeholder
    try:
        solve_allocation(placeholder, **_budget_kwargs(config))
    finally:
        solver_logger.setLevel(level)


def allocate_bits(problem: AllocationProblem, config: AdaQuantConfig, *, time_limit: float | None = None) -> Allocation:
    """Solve ``problem`` under the config's size/BOPs budgets (units from the config; pins from the problem).

    Raises:
        ValueError: the config has no budget.
        InfeasibleBudgetError: no assignment fits; the message states the smallest feasible budget.
    """
    return solve_allocation(problem, time_limit=time_limit, **_budget_kwargs(config))


def allocation_to_layer_bits(allocation: Allocation | Mapping[str, BitOption]) -> dict[str, tuple[int, int | None]]:
    """``{layer: (weight_bits, activation_bits or None)}``, the form of ``AdaQuantConfig.layer_bits``."""
    assignment = allocation.assignment if isinstance(allocation, Allocation) else allocation
    return {name: bits_of_option(opt) for name, opt in assignment.items()}


def allocated_config(config: AdaQuantConfig, allocation: Allocation | Mapping[str, BitOption]) -> AdaQuantConfig:
    """``config`` with the allocation as ``layer_bits`` and the budget it was solved for cleared (what
    :func:`hf_adaquant.quantize.allocate_for_config` returns after measuring and solving).

    This is the config that reproduces the run (and that a saved checkpoint records): re-running it gives the
    same bits without allocating again.
    """
    return config.replace(layer_bits=allocation_to_layer_bits(allocation), size_budget=None, bops_budget=None)


def budget_fields(config: AdaQuantConfig) -> dict[str, Any]:
    """The budget fields of ``config`` (what an allocation was solved for), JSON-able."""
    return {name: getattr(config, name) for name in ("size_budget", "size_budget_unit", "bops_budget",
                                                       "bops_budget_unit")}


def allocation_record(allocation: Allocation, config: AdaQuantConfig) -> dict[str, Any]:
    """``allocation.to_dict()`` plus ``"budget"``: the budget fields of the config it was solved under."""
    return {**allocation.to_dict(), "budget": budget_fields(config)}
