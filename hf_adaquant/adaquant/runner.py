"""The per-layer phase over a whole model: one process, or several ranks, resumable from a work dir.

* parallel variant: layers are independent jobs. Under a distributed launch each rank takes a cost-balanced
  share, optimises it on its own device and the results are gathered, so every rank assembles the same model.
  Each layer's random stream comes from ``(seed, layer name)``: the result is bitwise the one of one process.
* sequential variant: layers must run in order (each sees the quantized prefix), so the ranks work together on
  every layer, data-parallel over the calibration samples (:mod:`hf_adaquant.distributed.data_parallel`).

With a work dir, every finished layer is checkpointed atomically and a re-run skips it
(:mod:`hf_adaquant.distributed.workdir`).

With ``config.reconstruction="block"`` (sequential variant) the layers of each block of the stage plan are
optimised together on the block's output (:mod:`hf_adaquant.adaquant.block`); stem and head layers, and every
layer of a model without a plan (a warning says why), stay per layer.

Sequential captures use staged propagation (:mod:`hf_adaquant.adaquant.staged`) when the model's blocks form a
chain (O(depth) forward work), whole-model captures otherwise (the reason is logged). Every activation a run
caches shares one memory budget (``config.max_cache_bytes``) and one spill directory, removed when the run ends
however it ends.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm  # the bars' type (huggingface_hub's tqdm subclasses it)

from ..config import AdaQuantConfig
from ..distributed import (DataParallelSync, DistributedContext, DistributedRunError, WorkDir, assign_layers,
                           estimate_layer_cost, get_context, run_fingerprint, shard_batches)
from ..distributed.workdir import layer_state, load_layer_state
from ..prepare import LayerInfo
from ..utils.batches import Batch, batch_size
from ..utils.logging import progress_bar
from ..utils.seeding import make_generator
from . import block, layerwise
from .cache import capture_layer_io, capture_layers_io
from .layerwise import LayerReport, layer_seed_salt
from .spill import CacheBudget, SpillDir
from .staged import StagedRunner
from .stages import StagePlan, find_stage_plan

__all__ = ["run_adaquant", "run_layers"]

_logger = logging.getLogger(__name__)
# A model this deep without stages is worth a warning: its sequential captures cost depth^2 forwards.
_WARN_UNSTAGED_LAYERS = 16


def _cache_dtype(config: AdaQuantConfig) -> torch.dtype:
    return torch.float16 if config.cache_dtype == "float16" else torch.float32


def _resume(ctx: DistributedContext, work_dir: str | os.PathLike | None, qmodel: nn.Module, fp_model: nn.Module,
            layer_names: Sequence[str], batches: Sequence[Batch], config: AdaQuantConfig,
            units: Sequence[list[str]] | None = None) -> tuple[WorkDir | None, dict[str, LayerReport]]:
    """Open (or create) the work dir on rank 0 and load its finished layers into ``qmodel`` on every rank.

    With ``units`` (block reconstruction's groups of jointly optimised layers) a group counts as finished only
    when all its layers are: a run killed while checkpointing a block redoes the whole block, from the layers'
    initial states, so the resumed result is bitwise the uninterrupted one.
    """
    if work_dir is None:
        return None, {}
    store = WorkDir(work_dir)
    error, finished = None, None
    if ctx.is_main:
        try:
            processes = ctx.world_size if config.variant == "sequential" else None
            store.prepare(run_fingerprint(config, qmodel, fp_model, layer_names, batches, processes))
            finished = store.finished(layer_names)
        except Exception as e:  # every rank raises it, none waits for rank 0
            error = e
    ctx.sync_failure(error, "checking the work dir")
    finished = ctx.broadcast_object(finished)
    if units is not None:
        complete = {name for unit in units if all(n in finished for n in unit) for name in unit}
        partial = sorted(set(finished) - complete)
        if partial:
            _logger.info("work dir %s: block of %s was only partly checkpointed, optimising it again", work_dir,
                         partial)
        finished = [name for name in finished if name in complete]
    done = {name: LayerReport(**store.load_layer(name, qmodel.get_submodule(name))) for name in finished}
    if done:
        _logger.info("resuming from %s: %d of %d layers already done", work_dir, len(done), len(layer_names))
    return store, done


def _layer_costs(names: Sequence[str], qmodel: nn.Module, config: AdaQuantConfig, num_samples: int,
                 layer_info: Mapping[str, LayerInfo] | None, layer_bytes: Mapping[str, int] | None) -> dict[str, float]:
    costs = {}
    for name in names:
        if layer_info is not None and name in layer_info:
            costs[name] = estimate_layer_cost(layer_info[name], config, num_samples)
        else:  # rough: weights x cached activations
            costs[name] = float(qmodel.get_submodule(name).weight.numel()) * (layer_bytes or {}).get(name, 1)
    return costs


def _run_parallel(ctx: DistributedContext, qmodel: nn.Module, fp_model: nn.Module, todo: Sequence[str],
                  batches: Sequence[Batch], config: AdaQuantConfig, store: WorkDir | None, bar: tqdm,
                  layer_bytes: Mapping[str, int] | None, layer_info: Mapping[str, LayerInfo] | None,
                  budget: CacheBudget, spill: SpillDir) -> dict[str, LayerReport]:
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
        groups = layerwise._parallel_groups(mine, dict(layer_bytes) if layer_bytes else None, config.max_cache_bytes)
        for group in (g for g in groups if g):  # a rank may have nothing left to do
            current = f"capturing layers {group[0]!r}..{group[-1]!r}"
            caches = capture_layers_io(fp_model, group, batches, dtype=_cache_dtype(config), budget=budget,
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


def _stage_plan(ctx: DistributedContext, fp_model: nn.Module, layer_names: Sequence[str], batches: Sequence[Batch],
                config: AdaQuantConfig) -> StagePlan | None:
    """The model's stages for staged propagation, or None (whole-model captures; the reason is logged)."""
    if not config.staged_propagation:
        return None
    plan, why = find_stage_plan(fp_model, layer_names, batches[0])
    if ctx.is_distributed and not all(ctx.all_gather_object(plan is not None)):  # every rank captures alike
        plan, why = None, why or "another rank found no stages"
    if plan is None:
        log = _logger.warning if len(layer_names) >= _WARN_UNSTAGED_LAYERS else _logger.info
        log("staged propagation is off for this model, each layer's inputs come from whole-model forward passes "
            "(forward work grows with depth squared): %s", why)
    else:
        _logger.info("staged propagation over %d blocks (%s .. %s)", len(plan.blocks), plan.blocks[0],
                     plan.blocks[-1])
    return plan


def _block_units(plan: StagePlan, layer_names: Sequence[str]) -> list[list[str]]:
    """Groups optimised together in block mode: the layers of each block; stem and head layers one by one."""
    units: list[list[str]] = []
    previous = None
    for name in layer_names:
        stage = plan.stage_of[name]
        inside = 0 <= stage < plan.head
        if inside and stage == previous:
            units[-1].append(name)
        else:
            units.append([name])
        previous = stage if inside else None
    return units


def _block_plan(ctx: DistributedContext, fp_model: nn.Module, layer_names: Sequence[str], batches: Sequence[Batch],
                config: AdaQuantConfig) -> StagePlan | None:
    """The stage plan block reconstruction runs on, or None (per-layer reconstruction; the reason is logged)."""
    if config.reconstruction != "block" or not layer_names:
        return None
    if ctx.is_distributed:  # every rank raises alike (config only)
        raise ValueError("reconstruction='block' does not run under a distributed launch yet (the ranks would have "
                         "to split each block's steps); accepted there: reconstruction='layer'")
    plan, why = find_stage_plan(fp_model, layer_names, batches[0])
    if plan is None:
        _logger.warning("reconstruction='block' falls back to per-layer reconstruction for this model: its blocks "
                        "do not form a chain the staged engine can replay (%s)", why)
    return plan


def _run_block(qmodel: nn.Module, plan: StagePlan, staged: StagedRunner, unit: list[str], config: AdaQuantConfig,
               store: WorkDir | None) -> list[LayerReport]:
    stage = plan.stage_of[unit[0]]
    block_name = plan.blocks[stage]
    salt = layer_seed_salt(block_name)
    layers = {name: qmodel.get_submodule(name) for name in unit}
    reports = block.optimize_block(qmodel.get_submodule(block_name), layers, staged, stage, config,
                                   make_generator(config.seed, salt), make_generator(config.seed, salt, 1),
                                   name=block_name)
    if store is not None:  # layer by layer; a block counts as finished once all its layers are (see _resume)
        for name, report in zip(unit, reports):
            store.save_layer(name, layers[name], report.to_dict())
    return reports


def _run_sequential(ctx: DistributedContext, qmodel: nn.Module, fp_model: nn.Module, layer_names: Sequence[str],
                    todo: Sequence[str], batches: Sequence[Batch], config: AdaQuantConfig, store: WorkDir | None,
                    bar: tqdm, budget: CacheBudget, spill: SpillDir,
                    block_plan: StagePlan | None = None) -> dict[str, LayerReport]:
    sync = DataParallelSync(ctx) if ctx.is_distributed else None
    local_batches = shard_batches(batches, ctx.rank, ctx.world_size) if sync is not None else list(batches)
    results: dict[str, LayerReport] = {}
    if not todo:
        return results
    plan = block_plan or _stage_plan(ctx, fp_model, layer_names, local_batches, config)
    staged = None if plan is None else StagedRunner(plan, qmodel, fp_model, local_batches,
                                                    dtype=_cache_dtype(config), budget=budget, spill=spill)
    units = [[name] for name in todo] if block_plan is None else [
        u for u in _block_units(block_plan, layer_names) if u[0] in todo]
    try:
        for unit in units:  # execution order; finished layers are already loaded, so the prefix is right
            if block_plan is not None and 0 <= block_plan.stage_of[unit[0]] < block_plan.head:
                for report in _run_block(qmodel, block_plan, staged, unit, config, store):
                    results[report.name] = report
                    bar.update(1)
                bar.set_postfix_str(f"{unit[0]}.. mse {report.mse_before:.3g}->{report.mse_after:.3g}")
                _logger.debug("%s", report)
                continue
            name = unit[0]
            layer = qmodel.get_submodule(name)
            error, cache = None, None
            try:
                if staged is not None:
                    cache = staged.capture(name)
                else:
                    cache = capture_layer_io(qmodel, fp_model, name, local_batches, dtype=_cache_dtype(config),
                                             budget=budget, spill=spill)
            except Exception as e:
                if sync is None:
                    raise
                error = e
            ctx.sync_failure(error, f"capturing layer {name!r}")
            salt = layer_seed_salt(name)
            generator = make_generator(config.seed, salt) if sync is None else make_generator(config.seed, salt,
                                                                                              ctx.rank)
            try:
                report = layerwise.optimize_layer(layer, cache, config, generator, name=name, sync=sync)
            except DistributedRunError:
                raise
            except BaseException as e:
                ctx.report_failure(e, f"layer {name!r}")
                raise
            finally:
                cache.cleanup()
            error = None
            if store is not None and ctx.is_main:  # every rank holds the same layer: one writer
                try:
                    store.save_layer(name, layer, report.to_dict())
                except Exception as e:
                    if sync is None:
                        raise
                    error = e
            ctx.sync_failure(error, f"checkpointing layer {name!r}")
            results[name] = report
            bar.update(1)
            bar.set_postfix_str(f"{name} mse {report.mse_before:.3g}->{report.mse_after:.3g}")
            _logger.debug("%s", report)
    finally:
        if staged is not None:
            staged.close()
    return results


def _move(models: Sequence[nn.Module], device: torch.device | None) -> list[tuple[nn.Module, torch.device]]:
    moved = []
    for model in models:
        param = next(model.parameters(), None)
        if device is not None and param is not None and param.device != device:
            moved.append((model, param.device))
            model.to(device)
    return moved


def run_adaquant(
    qmodel: nn.Module,
    fp_model: nn.Module,
    layer_names: Sequence[str],
    batches: Sequence[Batch],
    config: AdaQuantConfig,
    layer_bytes: Mapping[str, int] | None = None,
    *,
    layer_info: Mapping[str, LayerInfo] | None = None,
    work_dir: str | os.PathLike | None = None,
    context: DistributedContext | None = None,
) -> list[LayerReport]:
    """AdaQuant over ``layer_names`` (execution order) of ``qmodel``; ``fp_model`` gives inputs/targets.

    ``layer_bytes`` (estimated cache size per layer) lets the parallel variant capture several layers per pass;
    ``layer_info`` (:class:`~hf_adaquant.prepare.LayerInfo` by name) balances layers over ranks by cost.
    With ``work_dir`` finished layers are checkpointed and a re-run resumes (see the module docstring).

    Every rank of a launch must call this with the same arguments; all return the same reports and leave
    ``qmodel`` in the same state. Under a launch, the models are moved to the rank's device for the phase and
    moved back afterwards.
    """
    ctx = context or get_context()
    ctx.new_session()
    block_plan = _block_plan(ctx, fp_model, layer_names, batches, config)
    units = None if block_plan is None else _block_units(block_plan, layer_names)
    store, done = _resume(ctx, work_dir, qmodel, fp_model, layer_names, batches, config, units)
    todo = [name for name in layer_names if name not in done]
    bar = progress_bar(total=len(layer_names), initial=len(done), desc=f"AdaQuant ({config.variant})",
                       disable=not config.progress or not ctx.is_main)
    moved = _move([fp_model, qmodel], ctx.device if ctx.is_distributed else None)
    budget, spill = CacheBudget(config.max_cache_bytes), SpillDir()
    try:
        if config.variant == "parallel":
            new = _run_parallel(ctx, qmodel, fp_model, todo, batches, config, store, bar, layer_bytes, layer_info,
                                budget, spill)
        else:
            new = _run_sequential(ctx, qmodel, fp_model, layer_names, todo, batches, config, store, bar, budget,
                                  spill, block_plan)
    finally:  # success, failure or Ctrl-C: no spill file outlives the run
        spill.close()
        bar.close()
        for model, device in moved:
            model.to(device)
    reports = {**done, **new}
    return [reports[name] for name in layer_names]


run_layers = run_adaquant  # the name this function had before run_adaquant moved here from layerwise.py
