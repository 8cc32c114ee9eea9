"""The parallel variant of the per-layer phase: layers are independent jobs, inputs and targets from the FP model.

Under a distributed launch each rank takes a cost-balanced share, optimises it on its own device and the results
are gathered, so every rank assembles the same model. Each layer's random stream comes from ``(seed, layer
name)``: the result is bitwise the one of one process.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

from torch import nn
from tqdm.auto import tqdm  # the bars' type (huggingface_hub's tqdm subclasses it)

from ..config import AdaQuantConfig
from ..distributed import DistributedContext, DistributedRunError, WorkDir, assign_layers, estimate_layer_cost
from ..distributed.workdir import layer_state, load_layer_state
from ..prepare import LayerInfo
from ..utils.batches import Batch, batch_size
from ..utils.seeding import make_generator
from . import layerwise  # called as layerwise.optimize_layer: tests and tools wrap it there
from .capture import capture_layers_io
from .iocache import cache_dtype
from .layerwise import LayerReport, layer_seed_salt
from .spill import CacheBudget, SpillDir

__all__ = ["parallel_groups", "run_parallel"]

# The runner's logger (this code was part of runner.py): log filters and level settings keep working.
_logger = logging.getLogger(f"{__package__}.runner")


def parallel_groups(layer_names: Sequence[str], layer_bytes: dict[str, int] | None, budget: int) -> list[list[str]]:
    """Consecutive layers whose FP caches fit ``budget`` bytes together (one FP pass captures a whole group).

    Without ``layer_bytes`` (estimated cache bytes per layer) every layer is a group of its own; a layer missing
    from it counts as the whole budget.
    """
    if layer_bytes is None:
        return [[name] for name in layer_names]
    groups: list[list[str]] = [[]]
    used = 0
    for name in layer_names:
        size = layer_bytes.get(name, budget)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _layer_costs(names: Sequence[str], qmodel: nn.Module, config: AdaQuantConfig, num_samples: int,
                 layer_info: Mapping[str, LayerInfo] | None, layer_bytes: Mapping[str, int] | None) -> dict[str, float]:
    costs = {}
    for name in names:
        if layer_info is not None and name in layer_info:
            costs[name] = estimate_layer_cost(layer_info[name], config, num_samples)
        else:  # rough: weights x cached activations
            costs[name] = float(qmodel.get_submodule(name).weight.numel()) * (layer_bytes or {}).get(name, 1)
    return costs


def run_parallel(ctx: DistributedContext, qmodel: nn.Module, fp_model: nn.Module, todo: Sequence[str],
                 batches: Sequence[Batch], config: AdaQuantConfig, store: WorkDir | None, bar: tqdm,
                 layer_bytes: Mapping[str, int] | None, layer_info: Mapping[str, LayerInfo] | None,
                 budget: CacheBudget, spill: SpillDir) -> dict[str, LayerReport]:
    """Optimise the layers ``todo`` of ``qmodel`` (this rank's share under a launch, gathered on every rank).

    Each finished layer is checkpointed to ``store`` (if any) and counted on ``bar``; caches share ``budget`` and
    ``spill``. A failure is reported to the other ranks before it is raised.
    """
    if ctx.is_distributed:
        num_samples = sum(batch_size(b) for b in batches)
        costs = _layer_costs(todo, qmodel, config, num_samples, layer_info, layer_bytes)
        mine = assign_layers(costs, todo, ctx.world_size)[ctx.rank]
        _logger.info("rank %d optimises %d of %d layers", ctx.rank, len(mine), len(todo))
    else:
        mine = list(todo)
    on_step = ctx.check_abort if ctx.is_distributed else None
    results: dict[str, LayerReport] = {}
    current = "capture"
    try:
        groups = parallel_groups(mine, dict(layer_bytes) if layer_bytes else None, config.max_cache_bytes)
        for group in (g for g in groups if g):  # a rank may have nothing left to do
            current = f"capturing layers {group[0]!r}..{group[-1]!r}"
            caches = capture_layers_io(fp_model, group, batches, dtype=cache_dtype(config), budget=budget,
                                       spill=spill)
            try:
                for name in group:
                    current = f"layer {name!r}"
                    ctx.check_abort()
                    layer = qmodel.get_submodule(name)
                    cache = caches.pop(name)
                    try:
                        report = layerwise.optimize_layer(layer, cache, config,
                                                          make_generator(config.seed, layer_seed_salt(name)),
                                                          name=name, on_step=on_step)
                    finally:
                        cache.cleanup()
                    if store is not None:
                        store.save_layer(name, layer, report.to_dict())
                    results[name] = report
                    bar.update(1)
                    bar.set_postfix_str(f"{name} mse {report.mse_before:.3g}->{report.mse_after:.3g}")
                    _logger.debug("%s", report)
            finally:
                for cache in caches.values():
                    cache.cleanup()
        current = "gathering results"
        if not ctx.is_distributed:
            return results
        ctx.barrier("layer-parallel done")
    except DistributedRunError:
        raise
    except BaseException as e:  # tell the other ranks now, rather than leaving them waiting for our results
        ctx.report_failure(e, current)
        raise
    local = [(name, *layer_state(qmodel.get_submodule(name)), results[name].to_dict()) for name in mine]
    for items in ctx.all_gather_object(local):
        for name, tensors, attributes, report in items:
            if name not in results:
                load_layer_state(qmodel.get_submodule(name), tensors, attributes)
                results[name] = LayerReport(**report)
                bar.update(1)
    return results
