"""Distributed and resumable AdaQuant: ranks and devices, job assignment, data parallelism, work directories.

Launch any script that calls :func:`hf_adaquant.quantize` with ``torchrun --nproc_per_node N`` (CPU, gloo) or
``accelerate launch --num_processes N`` (GPUs, nccl): every rank calls ``quantize`` and gets the same model.
"""

from .context import DistributedContext, DistributedRunError, get_context, is_main_process
from .data_parallel import DataParallelSync, shard_batches
from .schedule import assign_layers, estimate_layer_cost
from .workdir import WorkDir, WorkDirCorruptError, WorkDirMismatchError, run_fingerprint

__all__ = [
    "DataParallelSync",
    "DistributedContext",
    "DistributedRunError",
    "WorkDir",
    "WorkDirCorruptError",
    "WorkDirMismatchError",
    "assign_layers",
    "estimate_layer_cost",
    "get_context",
    "is_main_process",
    "run_fingerprint",
    "shard_batches",
]
