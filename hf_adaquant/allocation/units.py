"""Units of the allocation budgets and totals of an assignment: weight size (bits, bytes, fraction of FP32) and
BOPs (absolute, fraction of FP32: ``sum macs * 32 * 32``)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .problem import Allocation, AllocationProblem, BitOption

__all__ = ["BOPS_UNITS", "SIZE_UNITS", "absolute_to_bops", "bits_to_size", "bops_of", "bops_to_absolute",
           "check_unit", "format_number", "make_allocation", "size_of", "size_to_bits", "uniform_allocation"]

SIZE_UNITS: tuple[str, ...] = ("fraction", "bits", "bytes")
BOPS_UNITS: tuple[str, ...] = ("fraction", "absolute")


def check_unit(unit: str, allowed: tuple[str, ...], what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``unit`` is not one of ``allowed``."""
    if unit not in allowed:
        raise ValueError(f"unknown {what} unit {unit!r}; expected one of {list(allowed)}")


def size_to_bits(problem: AllocationProblem, value: float, unit: str) -> float:
    """A size in ``unit`` as bits."""
    check_unit(unit, SIZE_UNITS, "size budget")
    if unit == "bits":
        return float(value)
    if unit == "bytes":
        return float(value) * 8.0
    if problem.fp32_size_bits == 0:
        raise ValueError("a size budget as a 'fraction' needs sum(num_params) > 0")
    return float(value) * problem.fp32_size_bits


def bits_to_size(problem: AllocationProblem, bits: float, unit: str) -> float:
    """Bits as a size in ``unit`` (inverse of :func:`size_to_bits`)."""
    if unit == "bits":
        return float(bits)
    if unit == "bytes":
        return float(bits) / 8.0
    return float(bits) / problem.fp32_size_bits


def bops_to_absolute(problem: AllocationProblem, value: float, unit: str) -> float:
    """A BOPs value in ``unit`` as absolute BOPs."""
    check_unit(unit, BOPS_UNITS, "BOPs budget")
    if unit == "absolute":
        return float(value)
    if problem.fp32_bops == 0:
        raise ValueError("a BOPs budget as a 'fraction' needs sum(macs) > 0")
    return float(value) * problem.fp32_bops


def absolute_to_bops(problem: AllocationProblem, bops: float, unit: str) -> float:
    """Absolute BOPs in ``unit`` (inverse of :func:`bops_to_absolute`)."""
    return float(bops) if unit == "absolute" else float(bops) / problem.fp32_bops


def format_number(value: float) -> str:
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
    check_unit(unit, SIZE_UNITS, "size")
    idx = _assignment_indices(problem, assignment)
    bits = int(problem.size_matrix()[np.arange(problem.num_layers), idx].sum())
    return bits if unit == "bits" else bits_to_size(problem, bits, unit)


def bops_of(problem: AllocationProblem, assignment: Mapping[str, BitOption], unit: str = "absolute") -> float:
    """BOPs of ``assignment`` ("absolute" or "fraction" of the FP32 BOPs)."""
    check_unit(unit, BOPS_UNITS, "BOPs")
    idx = _assignment_indices(problem, assignment)
    bops = float(problem.bops_matrix()[np.arange(problem.num_layers), idx].sum())
    return absolute_to_bops(problem, bops, unit)


def make_allocation(
    problem: AllocationProblem,
    idx: np.ndarray,
    *,
    solve_seconds: float,
    optimal: bool = True,
    mip_gap: float | None = None,
) -> Allocation:
    """The :class:`Allocation` of option indices ``idx`` (one per layer) with its totals."""
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
    return make_allocation(problem, idx, solve_seconds=0.0)
