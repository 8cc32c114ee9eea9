"""The per-layer phase over a whole model: one process, or several ranks, resumable from a work dir.

* parallel variant (:mod:`hf_adaquant.adaquant.parallel`): layers are independent jobs. Under a distributed launch
  each rank takes a cost-balanced share, optimises it on its own device and the results are gathered, so every
  rank assembles the same model. Each layer's random stream comes from ``(seed, layer name)``: the result is
  bitwise the one of one process.
* sequential variant (:mod:`hf_adaquant.adaquant.sequential`): layers must run in order (each sees the quantized
  prefix), so the ranks work together on every layer, data-parallel over the calibration samples
  (:mod:`hf_adaquant.distributed.data_parallel`).

With a work dir, every finished layer is checkpointed atomically and a re-run skips it
(:mod:`hf_adaquant.adaquant.resume`, :mod:`hf_adaquant.distributed.workdir`).

With ``config.reconstruction="block"`` (sequential variant) the layers of each block of the stage plan are
optimised together on the block's output (:mod:`hf_adaquant.adaquant.block`); stem and head layers, and every
layer of a model without a plan (a warning says why), stay per layer.

Sequential captures use staged propagation (:mod:`hf_adaquant.adaquant.staged`) when the model's blocks form a
chain (O(depth) forward work), whole-model captures otherwise (the reason is logged). Every activation a run
caches shares one memory budget (``config.max_cache_bytes``) and one spill directory, removed when the run ends
however it ends.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import nn

from ..config import AdaQuantConfig
from ..distributed import DistributedContext, get_context
from ..prepare import LayerInfo
from ..utils.batches import Batch
from ..utils.logging import progress_bar
from .layerwise import LayerReport
from .parallel import run_parallel
from .resume import resume_from_work_dir
from .sequential import block_units, find_block_plan, run_sequential
from .spill import CacheBudget, SpillDir

__all__ = ["run_adaquant", "run_layers"]


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
    block_plan = find_block_plan(ctx, fp_model, layer_names, batches, config)
    units = None if block_plan is None else block_units(block_plan, layer_names)
    store, done = resume_from_work_dir(ctx, work_dir, qmodel, fp_model, layer_names, batches, config, units)
    todo = [name for name in layer_names if name not in done]
    bar = progress_bar(total=len(layer_names), initial=len(done), desc=f"AdaQuant ({config.variant})",
                       disable=not config.progress or not ctx.is_main)
    moved = _move([fp_model, qmodel], ctx.device if ctx.is_distributed else None)
    budget, spill = CacheBudget(config.max_cache_bytes), SpillDir()
    try:
        if config.variant == "parallel":
            new = run_parallel(ctx, qmodel, fp_model, todo, batches, config, store, bar, layer_bytes, layer_info,
                               budget, spill)
        else:
            new = run_sequential(ctx, qmodel, fp_model, layer_names, todo, batches, config, store, bar, budget,
                                 spill, block_plan)
    finally:  # success, failure or Ctrl-C: no spill file outlives the run
        spill.close()
        bar.close()
        for model, device in moved:
            model.to(device)
    reports = {**done, **new}
    return [reports[name] for name in layer_names]


run_layers = run_adaquant  # the name this function had before run_adaquant moved here from layerwise.py
