"""AdaQuant proper: per layer, Adam on MSE(Q-layer(x), y_fp) over W', bias, weight and input quantizer steps.

Parallel variant: ``x`` comes from the FP model (layers independent). Sequential variant: ``x`` comes from the
already-quantized prefix for every calibration sample, targets stay FP. The parts of one optimisation step live in
:mod:`~hf_adaquant.adaquant.optim`, the layer loss on the cache in :mod:`~hf_adaquant.adaquant.evaluation`.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import zlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..calibrate import init_weight_range
from ..config import AdaQuantConfig
from ..nn import QModuleMixin
from ..utils.profiling import RunProfile, current_profile
from .evaluation import count_flops, evaluate_layer, phases
from .iocache import IOCache
from .optim import (AUTO_LEARNED_ROUNDING_MAX_BITS, PerChannelSteps, improves, layer_loss, limit_weight_deviation,
                    loss_scale, param_groups, state_without_rounding, uses_learned_rounding)
from .ranges import init_input_range, init_output_range
from .rounding import LearnedRounding, annealed_beta

if TYPE_CHECKING:
    from ..distributed import DataParallelSync

# init_input_range, AUTO_LEARNED_ROUNDING_MAX_BITS: imported from here before the split (allocation/sensitivity.py)
__all__ = ["AUTO_LEARNED_ROUNDING_MAX_BITS", "LayerReport", "init_input_range", "layer_seed_salt", "optimize_layer"]

_logger = logging.getLogger(__name__)


def layer_seed_salt(name: str) -> int:
    """Salt of a layer's random stream: from its name, so a result never depends on which rank ran it or when."""
    return zlib.crc32(name.encode())


@dataclass
class LayerReport:
    """Per-layer outcome: MSE to the FP output before and after optimisation."""

    name: str
    weight_bits: int
    activation_bits: int | None
    mse_before: float
    mse_after: float
    seconds: float
    num_samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def optimize_layer(
    layer: QModuleMixin,
    cache: IOCache,
    config: AdaQuantConfig,
    generator: torch.Generator,
    name: str = "",
    *,
    sync: DataParallelSync | None = None,
    on_step: Callable[[], None] | None = None,
    profile: RunProfile | None = None,
) -> LayerReport:
    """Initialise ``layer``'s ranges from ``cache``, then run AdaQuant on it in place.

    The learning rates follow a cosine decay and the best state among a few checkpoints (the range
    initialisation included) is kept, so the result is never worse than the initialisation on the evaluated
    samples.

    Args:
        sync: data-parallel mode (sequential variant under a distributed launch): ``cache`` holds this rank's
            shard of the samples; range statistics, evaluations and gradients are combined over ranks, and every
            rank must call this for the same layer.
        on_step: called before every step (the distributed runner stops there when another rank failed).
        profile: where the time and FLOPs of range initialisation, evaluations and optimisation steps go; the
            current profile (:func:`~hf_adaquant.utils.profiling.profiling`) when None, nothing when neither.
    """
    start = time.perf_counter()
    profile = profile if profile is not None else current_profile()
    section = phases(profile)
    with section("range_init"):
        init_weight_range(layer, config.weight_range_method, name)
        init_input_range(layer, cache, config.activation_range_method, seed=config.seed, sync=sync, name=name)
        init_output_range(layer, cache, config.activation_range_method, seed=config.seed, sync=sync, name=name)
    mse_before = evaluate_layer(layer, cache, config.batch_size, sync, profile)
    best_mse, best_state = mse_before, copy.deepcopy(layer.state_dict())
    original_weight = layer.weight.detach().clone()
    rounding = None
    if uses_learned_rounding(config, layer.weight_quantizer.bits) and config.iterations > 0:
        rounding = LearnedRounding(layer.weight, layer.weight_quantizer)
        layer.weight_rounding = rounding
    groups = param_groups(layer, config, rounding)
    params = [p for g in groups for p in g["params"]]
    # Same work per step for every layer: early layers with big feature maps take fewer samples per step.
    per_sample = cache.output_size_per_sample()
    if sync is not None:  # shards may hold different shapes (sequence lengths): agree on the largest
        per_sample = max(sync.context.all_gather_object(per_sample))
    step_batch = max(1, min(config.batch_size, config.max_step_elements // per_sample))
    if sync is not None:  # each rank draws its share of the step's samples
        step_batch = sync.local_count(step_batch)
    # The layer loss can turn back up after a few dozen steps (W' starts to overfit the cache): decay the
    # learning rates and keep the best state seen at a few checkpoints.
    checkpoint_every = max(1, config.iterations // 5)
    if config.iterations > 0 and groups:
        optimizer = torch.optim.Adam(groups)
        per_channel = PerChannelSteps(layer) if rounding is None else None
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
        for step in range(1, config.iterations + 1):
            if on_step is not None:
                on_step()
            with section("optimisation"):
                layer.train()
                with section("optimisation/sample"):
                    x, y = cache.sample(step_batch, generator)
                    x, y = x.to(layer.weight.device), y.to(layer.weight.device)
                loss = layer_loss(layer, x, y)
                beta = None if rounding is None else annealed_beta(step, config.iterations)
                if beta is not None:
                    # Relative MSE keeps the regulariser weight meaningful across layers of any output scale.
                    loss = loss / loss_scale(mse_before) + config.rounding_regularization * rounding.regularizer(beta)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if sync is not None:
                    sync.average_gradients(params, len(x), f"optimising layer {name!r}")
                if per_channel is not None:
                    per_channel.before_step()
                optimizer.step()
                if per_channel is not None:
                    per_channel.after_step()
                schedule.step()
                if config.weight_deviation_limit is not None:
                    limit_weight_deviation(layer, original_weight, config.weight_deviation_limit)
                count_flops(profile, "optimisation", layer, x, backward=True)
            if step % checkpoint_every == 0 or step == config.iterations:
                layer.eval()
                if rounding is not None:
                    rounding.hard = True  # candidates are judged as they will be used: hard-rounded
                mse = evaluate_layer(layer, cache, config.batch_size, sync, profile)
                if improves(mse, best_mse):
                    if rounding is not None:
                        with torch.no_grad():
                            layer.weight.copy_(rounding.hard_weight())
                    best_mse, best_state = mse, state_without_rounding(layer)
                if rounding is not None:
                    rounding.hard = False
    layer.eval()
    if rounding is not None:
        del layer.weight_rounding
    for p in layer.parameters():
        p.grad = None
    layer.load_state_dict(best_state)
    mse_after = best_mse
    if not math.isfinite(mse_after):
        _logger.warning("layer %r: the layer loss is %s even at its range initialisation (activations too large "
                        "for float32 arithmetic?)", name, mse_after)
    num_samples = cache.num_samples
    if sync is not None:
        sync.broadcast_module(layer)
        num_samples = int(sync.sum([num_samples])[0])
    abits = None if layer.input_quantizer is None else layer.input_quantizer.bits
    return LayerReport(name, layer.weight_quantizer.bits, abits, mse_before, mse_after,
                       time.perf_counter() - start, num_samples)
