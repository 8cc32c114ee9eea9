"""The sequential variant of the per-layer phase: layers in order, each on the inputs of the quantized prefix.

Under a distributed launch the ranks work together on every layer, data-parallel over the calibration samples
(:mod:`hf_adaquant.distributed.data_parallel`). Captures use staged propagation
(:mod:`hf_adaquant.adaquant.staged`) when the model's blocks form a chain (O(depth) forward work), whole-model
captures otherwise (the reason is logged).

With ``config.reconstruction="block"`` the layers of each block of the stage plan are optimised together on the
block's output (:mod:`hf_adaquant.adaquant.block`); stem and head layers, and every layer of a model without a plan
(a warning says why), stay per layer.
"""

from __future__ import annotations

import logging
from typing import Sequence

from torch import nn
from tqdm.auto import tqdm  # the bars' type (huggingface_hub's tqdm subclasses it)

from ..config import AdaQuantConfig
from ..distributed import DataParallelSync, DistributedContext, DistributedRunError, WorkDir, shard_batches
from ..utils.batches import Batch
from ..utils.seeding import make_generator
from . import block, layerwise  # called as block.optimize_block, layerwise.optimize_layer: tests wrap them there
from .capture import capture_layer_io
from .iocache import cache_dtype
from .layerwise import LayerReport, layer_seed_salt
from .spill import CacheBudget, SpillDir
from .staged import StagedRunner
from .stages import StagePlan, find_stage_plan

__all__ = ["block_units", "find_block_plan", "run_sequential"]

# The runner's logger (this code was part of runner.py): log filters and level settings keep working.
_logger = logging.getLogger(f"{__package__}.runner")
# A model this deep without stages is worth a warning: its sequential captures cost depth^2 forwards.
_WARN_UNSTAGED_LAYERS = 16


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


def block_units(plan: StagePlan, layer_names: Sequence[str]) -> list[list[str]]:
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


def find_block_plan(ctx: DistributedContext, fp_model: nn.Module, layer_names: Sequence[str],
                    batches: Sequence[Batch], config: AdaQuantConfig) -> StagePlan | None:
    """The stage plan block reconstruction runs on, or None (per-layer reconstruction; the reason is logged).

    Raises:
        ValueError: block reconstruction under a distributed launch (on every rank: it depends on the config only).
    """
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
    if store is not None:  # layer by layer; a block counts as finished once all its layers are (see resume.py)
        for name, report in zip(unit, reports):
            store.save_layer(name, layers[name], report.to_dict())
    return reports


def run_sequential(ctx: DistributedContext, qmodel: nn.Module, fp_model: nn.Module, layer_names: Sequence[str],
                   todo: Sequence[str], batches: Sequence[Batch], config: AdaQuantConfig, store: WorkDir | None,
                   bar: tqdm, budget: CacheBudget, spill: SpillDir,
                   block_plan: StagePlan | None = None) -> dict[str, LayerReport]:
    """Optimise the layers ``todo`` of ``layer_names`` (execution order) in order, all ranks on every layer.

    Finished layers (not in ``todo``) must already be loaded into ``qmodel``: later layers see them. With
    ``block_plan`` (:func:`find_block_plan`) the layers inside blocks are optimised block by block. Each finished
    layer is checkpointed to ``store`` (if any, by rank 0) and counted on ``bar``; caches share ``budget`` and
    ``spill``.
    """
    sync = DataParallelSync(ctx) if ctx.is_distributed else None
    local_batches = shard_batches(batches, ctx.rank, ctx.world_size) if sync is not None else list(batches)
    results: dict[str, LayerReport] = {}
    if not todo:
        return results
    plan = block_plan or _stage_plan(ctx, fp_model, layer_names, local_batches, config)
    staged = None if plan is None else StagedRunner(plan, qmodel, fp_model, local_batches,
                                                    dtype=cache_dtype(config), budget=budget, spill=spill)
    units = [[name] for name in todo] if block_plan is None else [
        u for u in block_units(block_plan, layer_names) if u[0] in todo]
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
                    cache = capture_layer_io(qmodel, fp_model, name, local_batches, dtype=cache_dtype(config),
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
