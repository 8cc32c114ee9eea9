"""A layer's loss on its calibration cache (before, during and after AdaQuant), with its time and FLOPs profiled."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable

import torch

from ..nn import QModuleMixin
from ..utils.profiling import RunProfile, layer_flops
from .iocache import IOCache
from .optim import layer_loss

if TYPE_CHECKING:
    from ..distributed import DataParallelSync

__all__ = ["EVAL_SAMPLES", "count_flops", "evaluate_layer", "phases"]

EVAL_SAMPLES = 512  # MSE before/after is measured on at most this many cached samples...
_EVAL_ELEMENTS = 1 << 24  # ...and at most this many output values (big early feature maps)

_NULL = contextlib.nullcontext()


def _no_phase(name: str, flops: float = 0.0, kind: str = "gemm") -> contextlib.nullcontext:
    return _NULL


def phases(profile: RunProfile | None) -> Callable[..., contextlib.AbstractContextManager]:
    """``profile.phase`` (times a ``with`` block into a named phase), or one that records nothing without a profile."""
    return _no_phase if profile is None else profile.phase


def count_flops(profile: RunProfile | None, phase: str, layer: QModuleMixin, x: torch.Tensor, *,
                backward: bool) -> None:
    """Count one forward (and backward) pass of ``layer`` on ``x`` into ``phase`` of ``profile``."""
    if profile is None:
        return
    # Autograd computes the input gradient only when the (quantized) input carries one: the input step's.
    iq = layer.input_quantizer
    grad_input = backward and iq is not None and any(p.requires_grad for p in iq.parameters())
    kind, flops = layer_flops(layer, x.shape, grad_input=grad_input, grad_weight=backward)
    profile.add_flops(phase, flops, kind)


@torch.no_grad()
def evaluate_layer(layer: QModuleMixin, cache: IOCache, batch_size: int, sync: DataParallelSync | None = None,
                   profile: RunProfile | None = None) -> float:
    """Mean layer loss on the first cached samples (at most :data:`EVAL_SAMPLES`, fewer for big outputs).

    With ``sync`` each rank evaluates its share of those samples and the mean is over all ranks; a rank's error is
    raised on every rank. Time and FLOPs go to the ``"evaluation"`` phase of ``profile``.
    """
    with phases(profile)("evaluation"):
        return _evaluate_loss(layer, cache, batch_size, sync, profile)


def _evaluate_loss(layer: QModuleMixin, cache: IOCache, batch_size: int, sync: DataParallelSync | None,
                   profile: RunProfile | None) -> float:
    device = layer.weight.device
    per_sample = cache.output_size_per_sample()
    limit = max(1, min(EVAL_SAMPLES, _EVAL_ELEMENTS // per_sample))
    # Losses stay on the device until the end: one host sync per evaluation instead of one per batch (GPU),
    # summed on the host in the same order and precision as before (the kept checkpoint must not change).
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    error = None
    try:  # with ``sync`` each rank evaluates its share; the error flag travels with the sums
        for x, y in cache.iterate(batch_size, limit=limit if sync is None else sync.local_count(limit)):
            x, y = x.to(device), y.to(device)
            losses.append(layer_loss(layer, x, y))
            sizes.append(len(x))
            count_flops(profile, "evaluation", layer, x, backward=False)
        total = 0.0
        for loss, n in zip(torch.stack(losses).tolist() if losses else [], sizes):
            total += loss * n
    except Exception as e:
        if sync is None:
            raise
        error, total, sizes = e, 0.0, []
    count = sum(sizes)
    if sync is not None:
        total, count = sync.sum([total, count], error, "evaluating the layer")
    return total / max(count, 1)
