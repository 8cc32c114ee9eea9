"""Which rank optimises which layer: estimated cost per layer, greedy longest-processing-time assignment."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from ..config import AdaQuantConfig
from ..prepare import LayerInfo

__all__ = ["assign_layers", "estimate_layer_cost"]

# Element-wise work (fake quantization of input and weight, loss, activation) per value, relative to one MAC:
# it dominates in depthwise convs, whose MACs per output value are few.
_ELEMENTWISE_WEIGHT = 8.0


def estimate_layer_cost(info: LayerInfo, config: AdaQuantConfig, num_samples: int) -> float:
    """Relative time of :func:`~hf_adaquant.adaquant.optimize_layer` on one layer (arbitrary units).

    Mirrors its work: ``iterations`` steps of forward + backward (~3x the forward MACs) on a step batch capped
    by ``max_step_elements``, plus a few evaluations and the range initialisation over the cached samples.
    """
    out_elems = max(1, math.prod(info.output_shape))
    in_elems = max(1, math.prod(info.input_shape))
    per_sample = info.macs + _ELEMENTWISE_WEIGHT * (in_elems + out_elems)
    step_batch = max(1, min(config.batch_size, config.max_step_elements // out_elems))
    train = config.iterations * step_batch * 3 * per_sample
    evaluations = min(config.iterations, 5) + 1
    evaluate = evaluations * min(num_samples, 512) * per_sample
    init = num_samples * _ELEMENTWISE_WEIGHT * in_elems
    return float(train + evaluate + init)


def assign_layers(costs: Mapping[str, float], order: Sequence[str], world_size: int) -> list[list[str]]:
    """Split layers over ``world_size`` ranks, balancing the summed cost (greedy LPT).

    Layers are taken most expensive first and given to the least-loaded rank (ties: lowest rank, then execution
    order), so every rank computes the same assignment. Each rank's list comes back in execution ``order``.
    """
    position = {name: i for i, name in enumerate(order)}
    loads = [0.0] * world_size
    owned: list[list[str]] = [[] for _ in range(world_size)]
    for name in sorted(order, key=lambda n: (-costs[n], position[n])):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += costs[name]
        owned[rank].append(name)
    return [sorted(names, key=position.__getitem__) for names in owned]
