"""Data parallelism inside one layer (the sequential variant): split the samples, sum gradients and statistics.

Every rank holds the same layer and a shard of the calibration samples. Each optimisation step, ranks draw a
local share of the mini-batch, backpropagate its mean loss and all-reduce the count-weighted gradients (and the
sample count, in the same message): every rank then takes the same Adam step, like DDP.

What differs from one process (same seed): the samples of a step are drawn per shard (different mini-batches),
the activation-range subsample is drawn per shard, and floating-point sums are reduced in another order. The
result is an equally good model, not the same bits; the work dir therefore records the number of processes.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..quant import RangeObserver
from ..utils.batches import Batch, batch_size, slice_batch
from .context import DistributedContext, DistributedRunError

__all__ = ["DataParallelSync", "shard_batches"]


def shard_batches(batches: Sequence[Batch], rank: int, world_size: int) -> list[Batch]:
    """This rank's contiguous share of every batch (batches keep their shapes apart, e.g. sequence lengths).

    Raises:
        ValueError: there are fewer calibration samples than processes.
    """
    total = sum(batch_size(b) for b in batches)
    if total < world_size:
        raise ValueError(f"{total} calibration samples cannot be split over {world_size} processes")
    sizes = [batch_size(b) for b in batches]
    if max(sizes) < world_size:
        # Every batch is smaller than the world: slicing would leave rank 0 empty. Deal whole batches round-robin
        # instead, the same rule on every rank, so each sample still belongs to exactly one rank.
        if len(batches) < world_size:
            raise ValueError(f"{len(batches)} calibration batches of at most {max(sizes)} samples cannot be split "
                             f"over {world_size} processes; use larger batches")
        return [b for i, b in enumerate(batches) if i % world_size == rank]
    shards = []
    for b, n in zip(batches, sizes):
        start, stop = n * rank // world_size, n * (rank + 1) // world_size
        if stop > start:
            shards.append(slice_batch(b, start, stop))
    return shards


class DataParallelSync:
    """The collectives :func:`~hf_adaquant.adaquant.optimize_layer` needs to run one layer over all ranks."""

    def __init__(self, context: DistributedContext) -> None:
        self.context = context
        self.world_size = context.world_size
        self.rank = context.rank

    def local_count(self, count: int) -> int:
        """This rank's share of ``count`` samples (at least one)."""
        return max(1, math.ceil(count / self.world_size))

    def sum(self, values: Sequence[float], error: BaseException | None = None, where: str = "") -> list[float]:
        """Sum floats over ranks; if any rank passes an error, every rank raises (see ``sync_failure``)."""
        buf = torch.tensor([*values, 0.0 if error is None else 1.0], dtype=torch.float64)
        self.context.all_reduce_sum(buf)
        if buf[-1].item() > 0:
            self.context.sync_failure(error, where)  # every rank got here: gathers the message and raises
            raise DistributedRunError(f"a rank failed in {where}")  # not reached
        return buf[:-1].tolist()

    def average_gradients(self, params: Sequence[nn.Parameter], local_count: int, where: str) -> int:
        """Replace each rank's gradient of its local mean loss by the gradient of the global mean loss.

        Local gradients are weighted by the local sample count, summed over ranks and divided by the global
        count (terms identical on every rank, e.g. a regulariser, stay unchanged). Returns the global count.
        """
        device = params[0].device
        grads = [p.grad.reshape(-1) * local_count if p.grad is not None else torch.zeros(p.numel(), device=device)
                 for p in params]
        flat = torch.cat(grads + [torch.tensor([float(local_count)], device=device)])
        try:
            self.context.all_reduce_sum(flat)
        except Exception:
            # A peer died (gloo notices the closed connection): report its own message if it posted one.
            self.context.check_abort(force=True)
            raise
        total = flat[-1].item()
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = (flat[offset:offset + n] / total).reshape(p.shape).to(p.dtype)
            offset += n
        return int(total)

    def merge_observer(self, observer: RangeObserver) -> None:
        """Combine every rank's activation statistics into ``observer`` (same result on every rank)."""
        states = self.context.all_gather_object(
            (observer.min, observer.max, observer.sum_sample_min, observer.sum_sample_max, observer.num_samples,
             torch.cat(observer._values) if observer._values else torch.zeros(0)))
        observer.min = min(s[0] for s in states)
        observer.max = max(s[1] for s in states)
        observer.sum_sample_min = sum(s[2] for s in states)
        observer.sum_sample_max = sum(s[3] for s in states)
        observer.num_samples = sum(s[4] for s in states)
        observer._values = [torch.cat([s[5] for s in states])]

    def broadcast_module(self, module: nn.Module) -> None:
        """Make every rank hold rank 0's parameters and buffers (guards against any drift)."""
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():  # flags such as ``initialized`` are set alike on every rank
                self.context.broadcast_tensor(t)
