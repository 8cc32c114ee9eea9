"""AdaQuant proper: per layer, Adam on MSE(Q-layer(x), y_fp) over W', bias, weight and input quantizer steps.

Parallel variant: ``x`` comes from the FP model (layers independent). Sequential variant: ``x`` comes from the
already-quantized prefix for every calibration sample, targets stay FP.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import zlib
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from ..calibrate import init_weight_range
from ..config import AdaQuantConfig
from ..nn import QModuleMixin
from ..quant import RangeObserver
from ..utils.profiling import RunProfile, current_profile, layer_flops
from .cache import IOCache
from .rounding import LearnedRounding, annealed_beta

if TYPE_CHECKING:
    from ..distributed import DataParallelSync

__all__ = ["LayerReport", "layer_seed_salt", "optimize_layer"]  # run_adaquant: runner.py (no import cycle)

_logger = logging.getLogger(__name__)
# weight_rounding="auto": free W' (the paper's) down to 4 bits, learned rounding at 2-3 bits where free W'
# overfits (ResNet-20 W2A4: 82.8 free vs 88.5 learned, benchmarks/results/core_resnet20_w2_learned.json).
AUTO_LEARNED_ROUNDING_MAX_BITS = 3
_EVAL_SAMPLES = 512  # MSE before/after is measured on at most this many cached samples...
_EVAL_ELEMENTS = 1 << 24  # ...and at most this many output values (big early feature maps)


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


def _layer_loss(layer: QModuleMixin, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = layer(x)
    return F.mse_loss(layer.apply_output_activation(out), layer.apply_output_activation(y))


def _no_phase(name: str, flops: float = 0.0, kind: str = "gemm") -> contextlib.nullcontext:
    return _NULL


_NULL = contextlib.nullcontext()


def _count_flops(profile: RunProfile | None, phase: str, layer: QModuleMixin, x: torch.Tensor, *,
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
def _evaluate(layer: QModuleMixin, cache: IOCache, batch_size: int, sync: DataParallelSync | None = None,
              profile: RunProfile | None = None) -> float:
    section = _no_phase if profile is None else profile.phase
    with section("evaluation"):
        return _evaluate_loss(layer, cache, batch_size, sync, profile)


def _evaluate_loss(layer: QModuleMixin, cache: IOCache, batch_size: int, sync: DataParallelSync | None,
                   profile: RunProfile | None) -> float:
    device = layer.weight.device
    per_sample = cache.output_size_per_sample()
    limit = max(1, min(_EVAL_SAMPLES, _EVAL_ELEMENTS // per_sample))
    # Losses stay on the device until the end: one host sync per evaluation instead of one per batch (GPU),
    # summed on the host in the same order and precision as before (the kept checkpoint must not change).
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    error = None
    try:  # with ``sync`` each rank evaluates its share; the error flag travels with the sums
        for x, y in cache.iterate(batch_size, limit=limit if sync is None else sync.local_count(limit)):
            x, y = x.to(device), y.to(device)
            losses.append(_layer_loss(layer, x, y))
            sizes.append(len(x))
            _count_flops(profile, "evaluation", layer, x, backward=False)
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


@torch.no_grad()
def init_input_range(layer: QModuleMixin, cache: IOCache, method: str, seed: int,
                     sync: DataParallelSync | None = None, name: str = "") -> None:
    """Input quantizer range from the cached layer inputs (of all ranks' shards with ``sync``).

    Raises:
        ValueError: the range is not finite (naming the layer ``name``).
    """
    q = layer.input_quantizer
    if q is None:
        return
    observer = RangeObserver(seed=seed)
    error = None
    try:
        for x, _ in cache.iterate(256, targets=False):
            observer.update(x)
    except Exception as e:
        if sync is None:
            raise
        error = e
    if sync is not None:
        sync.context.sync_failure(error, "observing the layer inputs")
        sync.merge_observer(observer)
    try:
        q.set_range(*observer.compute(method, bits=q.bits, symmetric=q.symmetric))
    except ValueError as e:
        raise ValueError(f"input range of layer {name!r}: {e}") from None


def _improves(mse: float, best: float) -> bool:
    """``mse < best`` where a NaN or infinite loss is worse than any finite one (plain ``<`` is False with NaN)."""
    if not math.isfinite(mse):
        return False
    return not math.isfinite(best) or mse < best


def _loss_scale(mse_before: float) -> float:
    """Divisor that makes the learned-rounding loss relative; 1 when the initial loss is zero or not finite."""
    return max(mse_before, 1e-12) if math.isfinite(mse_before) else 1.0


class _PerChannelSteps:
    """Scale each output channel's Adam move of ``W'`` and of its weight step by that channel's own step.

    Adam moves every element by about ``lr`` per iteration whatever its gradient, so ``lr_weight`` and
    ``lr_weight_scale`` are given in units of a quantization step. Folded BatchNorms leave per-channel steps tens
    of times apart (EfficientNet-Lite0: up to 20x above the median): one layer-wide step would all but freeze the
    wide channels and shake the narrow ones.
    """

    def __init__(self, layer: QModuleMixin) -> None:
        self.weight, self.scale = layer.weight, layer.weight_quantizer.scale
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None

    def before_step(self) -> None:
        self._saved = (self.weight.detach().clone(), self.scale.detach().clone())

    @torch.no_grad()
    def after_step(self) -> None:
        weight_before, scale_before = self._saved
        step = scale_before.abs().reshape(-1, *[1] * (self.weight.dim() - 1))  # per channel (or one per tensor)
        self.weight.copy_(weight_before + (self.weight - weight_before) * step)
        self.scale.copy_(scale_before + (self.scale - scale_before) * scale_before.abs())


def _param_groups(layer: QModuleMixin, config: AdaQuantConfig, rounding: LearnedRounding | None) -> list[dict]:
    """Adam groups. ``W'`` and the weight step use unit-free rates, rescaled per channel by ``_PerChannelSteps``."""
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    groups = [{"params": [layer.bias], "lr": config.lr_bias}]
    if rounding is not None:  # the grid is frozen: only the up/down choices of the weights are learned
        groups.append({"params": [rounding.alpha], "lr": config.lr_rounding})
    else:
        groups += [{"params": [layer.weight], "lr": config.lr_weight},
                   {"params": [wq.scale], "lr": config.lr_weight_scale}]
        if not wq.symmetric:
            groups.append({"params": [wq.zero_point], "lr": config.lr_zero_point})
    if iq is not None:
        groups.append({"params": [iq.scale], "lr": config.lr_act_scale * iq.scale.detach().mean().item()})
        if not iq.symmetric:
            groups.append({"params": [iq.zero_point], "lr": config.lr_zero_point})
    return [g for g in groups if g["lr"] > 0]


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
    section = _no_phase if profile is None else profile.phase
    with section("range_init"):
        init_weight_range(layer, config.weight_range_method, name)
        init_input_range(layer, cache, config.activation_range_method, seed=config.seed, sync=sync, name=name)
    mse_before = _evaluate(layer, cache, config.batch_size, sync, profile)
    best_mse, best_state = mse_before, copy.deepcopy(layer.state_dict())
    original_weight = layer.weight.detach().clone()
    rounding = None
    learned = config.weight_rounding == "learned" or (
        config.weight_rounding == "auto" and layer.weight_quantizer.bits <= AUTO_LEARNED_ROUNDING_MAX_BITS)
    if learned and config.iterations > 0:
        rounding = LearnedRounding(layer.weight, layer.weight_quantizer)
        layer.weight_rounding = rounding
    groups = _param_groups(layer, config, rounding)
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
        per_channel = _PerChannelSteps(layer) if rounding is None else None
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
        for step in range(1, config.iterations + 1):
            if on_step is not None:
                on_step()
            with section("optimisation"):
                layer.train()
                with section("optimisation/sample"):
                    x, y = cache.sample(step_batch, generator)
                    x, y = x.to(layer.weight.device), y.to(layer.weight.device)
                loss = _layer_loss(layer, x, y)
                beta = None if rounding is None else annealed_beta(step, config.iterations)
                if beta is not None:
                    # Relative MSE keeps the regulariser weight meaningful across layers of any output scale.
                    loss = loss / _loss_scale(mse_before) + config.rounding_regularization * rounding.regularizer(beta)
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
                    _limit_weight_deviation(layer, original_weight, config.weight_deviation_limit)
                _count_flops(profile, "optimisation", layer, x, backward=True)
            if step % checkpoint_every == 0 or step == config.iterations:
                layer.eval()
                if rounding is not None:
                    rounding.hard = True  # candidates are judged as they will be used: hard-rounded
                mse = _evaluate(layer, cache, config.batch_size, sync, profile)
                if _improves(mse, best_mse):
                    if rounding is not None:
                        with torch.no_grad():
                            layer.weight.copy_(rounding.hard_weight())
                    best_mse, best_state = mse, _state_without_rounding(layer)
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


def _state_without_rounding(layer: QModuleMixin) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items() if not k.startswith("weight_rounding.")}


@torch.no_grad()
def _limit_weight_deviation(layer: QModuleMixin, original: torch.Tensor, limit: float) -> None:
    """Keep ``W'`` within ``limit`` weight steps of ``W``: fewer effective degrees of freedom at low bits."""
    step = layer.weight_quantizer.scale.detach().clamp(min=1e-8).reshape(-1, *[1] * (original.dim() - 1))
    layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, original + limit * step), original - limit * step))


def _parallel_groups(layer_names: Sequence[str], layer_bytes: dict[str, int] | None, budget: int) -> list[list[str]]:
    """Consecutive layers whose FP caches fit ``budget`` together (one FP pass captures a whole group)."""
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

