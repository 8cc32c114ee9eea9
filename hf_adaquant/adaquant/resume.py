"""Resuming the per-layer phase from a work dir: finished layers are loaded instead of optimised again."""

from __future__ import annotations

import logging
import os
from typing import Sequence

from torch import nn

from ..config import AdaQuantConfig
from ..distributed import DistributedContext, WorkDir, run_fingerprint
from ..utils.batches import Batch
from .layerwise import LayerReport

__all__ = ["resume_from_work_dir"]

# The runner's logger (this code was part of runner.py): log filters and level settings keep working.
_logger = logging.getLogger(f"{__package__}.runner")


def resume_from_work_dir(ctx: DistributedContext, work_dir: str | os.PathLike | None, qmodel: nn.Module,
                         fp_model: nn.Module, layer_names: Sequence[str], batches: Sequence[Batch],
                         config: AdaQuantConfig, units: Sequence[list[str]] | None = None
                         ) -> tuple[WorkDir | None, dict[str, LayerReport]]:
    """Open (or create) the work dir on rank 0 and load its finished layers into ``qmodel`` on every rank.

    Returns the work dir (None without ``work_dir``) and the reports of the layers already done. A work dir of a
    different run (another fingerprint) raises on every rank.

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
