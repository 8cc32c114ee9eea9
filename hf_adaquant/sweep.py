"""Budget sweeps: accuracy vs model size of the mixed-precision allocations, against uniform precisions.

Sensitivities are measured once (optionally cached); each budget is solved, quantized with the chosen per-layer
bits and evaluated with a user metric. For comparison every row also carries the best *uniform* setting (all
unpinned layers at one candidate option, first/last and ``pinned_layers`` kept as the policy says) whose size does
not exceed the mixed solution's. The rows plot with :func:`hf_adaquant.allocation.plot_pareto`.

A pipeline verb (it calls :func:`hf_adaquant.quantize` for every budget), so it sits above ``allocation/``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .allocation.budget import allocate_bits, allocation_record, allocation_to_layer_bits, candidate_options
from .allocation.ilp import Allocation, AllocationProblem, BitOption, InfeasibleBudgetError, bops_of, uniform_allocation
from .allocation.sensitivity import LossFn, measure_sensitivity
from .config import AdaQuantConfig
from .quantize import quantize
from .utils.batches import Batch, materialize_batches

__all__ = ["pareto_sweep"]

logger = logging.getLogger(__name__)


def _mean_bits(problem: AllocationProblem, allocation: Allocation) -> float:
    params = int(problem.num_params.sum())
    return allocation.weight_bits_total / params if params else 0.0


def _summary(problem: AllocationProblem, allocation: Allocation) -> dict[str, Any]:
    return {
        "predicted_criterion": allocation.predicted_criterion,
        "size_fraction": allocation.size_fraction,
        "weight_bits_total": allocation.weight_bits_total,
        "mean_weight_bits": _mean_bits(problem, allocation),
        "bops": allocation.bops,
        "bops_fraction": allocation.bops / problem.fp32_bops if problem.fp32_bops else 0.0,
    }


def _quantize_and_evaluate(model: nn.Module, batches: list[Batch], config: AdaQuantConfig,
                           allocation: Allocation | None, evaluate_fn: Callable[[nn.Module], float],
                           layer_bits: dict[str, tuple[int, int | None]]) -> tuple[float, float]:
    start = time.perf_counter()
    # The bits are given: the budget they were solved for is recorded with the allocation, not in the config.
    qmodel = quantize(model, batches, config.replace(layer_bits=layer_bits, size_budget=None, bops_budget=None))
    seconds = time.perf_counter() - start
    if allocation is not None:
        qmodel.hf_adaquant_report.allocation = allocation_record(allocation, config)
    return float(evaluate_fn(qmodel)), seconds


def pareto_sweep(
    model: nn.Module,
    batches: Sequence[Batch],
    config: AdaQuantConfig,
    budgets: Sequence[float],
    evaluate_fn: Callable[[nn.Module], float],
    *,
    cache_path: str | os.PathLike | None = None,
    labels: Any = None,
    loss_fn: LossFn | None = None,
    max_eval_samples: int | None = None,
    compare_uniform: bool = True,
    evaluate_fp: bool = True,
    higher_is_better: bool = True,
) -> list[dict[str, Any]]:
    """Solve, quantize and evaluate each size budget (in ``config.size_budget_unit``).

    Args:
        model: the float model (not modified).
        batches: calibration batches (for sensitivities and for every quantization run).
        config: pipeline, candidates, criterion, policy; its ``bops_budget`` (if any) stays an extra constraint
            for every budget, its ``size_budget`` is replaced by each of ``budgets``.
        budgets: size budgets to sweep.
        evaluate_fn: metric of a model (e.g. top-1 accuracy on a held-out set).
        cache_path: sensitivity cache (see :func:`measure_sensitivity`).
        labels, loss_fn: for ``sensitivity_criterion="task"``.
        max_eval_samples: samples the sensitivity criterion is evaluated on (see :func:`measure_sensitivity`).
        compare_uniform: also quantize and evaluate the best uniform setting of at most the mixed solution's size
            (the largest uniform options that fit, each evaluated once across budgets; the best metric is kept).
        evaluate_fp: record ``evaluate_fn(model)`` as ``fp_metric`` in every row.
        higher_is_better: how to pick the best uniform setting.

    Returns:
        One dict per budget: ``budget``, ``budget_unit``, ``predicted_criterion``, ``size_fraction``,
        ``mean_weight_bits``, ``bops``, ``bops_fraction``, ``metric``, ``quantize_seconds``, ``assignment``
        (``{layer: "W4A8"}``), ``allocation`` (``Allocation.to_dict()``), ``uniform`` (or None), ``fp_metric``
        and ``sensitivity_seconds`` (near 0 when cached); an infeasible budget gives ``error`` and
        ``min_size_budget`` instead of the solution's keys.
    """
    batches = materialize_batches(batches, config.max_calibration_samples)
    measure_config = config.replace(size_budget=None, bops_budget=None, layer_bits={})
    start = time.perf_counter()
    problem = measure_sensitivity(model, batches, measure_config, labels=labels, loss_fn=loss_fn,
                                  cache_path=cache_path, max_eval_samples=max_eval_samples,
                                  progress=config.progress)
    sensitivity_seconds = time.perf_counter() - start
    fp_metric = float(evaluate_fn(model)) if evaluate_fp else None
    uniform_results: dict[BitOption, dict[str, Any]] = {}
    bops_cap = None
    if config.bops_budget is not None:
        bops_cap = (config.bops_budget if config.bops_budget_unit == "absolute"
                    else config.bops_budget * problem.fp32_bops)

    def evaluate_uniform(option: BitOption) -> dict[str, Any]:
        if option not in uniform_results:
            alloc = uniform_allocation(problem, option)
            metric, seconds = _quantize_and_evaluate(
                model, batches, config.replace(size_budget=None, bops_budget=None), None, evaluate_fn,
                allocation_to_layer_bits(alloc))
            uniform_results[option] = {"option": option.label, **_summary(problem, alloc), "metric": metric,
                                       "quantize_seconds": seconds}
            logger.info("uniform %s: size %.4f metric %.4g", option.label, alloc.size_fraction, metric)
        return uniform_results[option]

    rows: list[dict[str, Any]] = []
    for budget in budgets:
        row: dict[str, Any] = {"budget": float(budget), "budget_unit": config.size_budget_unit, "fp_metric": fp_metric,
                               "sensitivity_seconds": sensitivity_seconds}
        budget_config = config.replace(size_budget=float(budget), layer_bits={})
        try:
            allocation = allocate_bits(problem, budget_config)
        except InfeasibleBudgetError as exc:
            logger.warning("budget %s: %s", budget, exc)
            row.update(error=str(exc), min_size_budget=exc.min_size_budget)
            rows.append(row)
            continue
        metric, seconds = _quantize_and_evaluate(model, batches, budget_config, allocation, evaluate_fn,
                                                 allocation_to_layer_bits(allocation))
        row.update(_summary(problem, allocation))
        row.update(metric=metric, quantize_seconds=seconds,
                   assignment={name: opt.label for name, opt in allocation.assignment.items()},
                   allocation=allocation.to_dict(), uniform=None)
        logger.info("budget %s: size %.4f predicted %.4g metric %.4g", budget, allocation.size_fraction,
                    allocation.predicted_criterion, metric)
        if compare_uniform:
            fitting = []
            for option in candidate_options(config):
                try:
                    alloc = uniform_allocation(problem, option)
                except ValueError:
                    continue
                if alloc.weight_bits_total <= allocation.weight_bits_total and (
                        bops_cap is None or bops_of(problem, alloc.assignment) <= bops_cap * (1 + 1e-12)):
                    fitting.append(option)
            # Only the maximal options (no fitting option has >= weight and >= activation bits) can be best.
            maximal = [o for o in fitting if not any(
                p != o and p.weight_bits >= o.weight_bits and p.activation_bits >= o.activation_bits for p in fitting)]
            results = [evaluate_uniform(o) for o in maximal]
            if results:
                pick = max if higher_is_better else min
                best = pick(results, key=lambda r: r["metric"])
                row["uniform"] = {**best, "compared": [r["option"] for r in results]}
        rows.append(row)
    return rows
