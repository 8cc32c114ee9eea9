"""AdaQuant proper: per layer, Adam on MSE(Q-layer(x), y_fp) over W', bias, weight and input quantizer steps.

Parallel variant: ``x`` comes from the FP model (layers independent). Sequential variant: ``x`` comes from the
already-quantized prefix for every calibration sample, targets stay FP.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import init_weight_range
from ..config import AdaQuantConfig
from ..nn import QModuleMixin
from ..quant import RangeObserver
from ..utils.batches import Batch
from ..utils.seeding import make_generator
from .cache import IOCache, capture_layer_io, capture_layers_io

__all__ = ["LayerReport", "optimize_layer", "run_adaquant"]

_logger = logging.getLogger(__name__)
_EVAL_SAMPLES = 512  # MSE before/after is measured on at most this many cached samples...
_EVAL_ELEMENTS = 1 << 24  # ...and at most this many output values (big early feature maps)


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


@torch.no_grad()
def _evaluate(layer: QModuleMixin, cache: IOCache, batch_size: int) -> float:
    total, count = 0.0, 0
    device = layer.weight.device
    per_sample = cache.output_size_per_sample()
    limit = max(1, min(_EVAL_SAMPLES, _EVAL_ELEMENTS // per_sample))
    for x, y in cache.iterate(batch_size, limit=limit):
        x, y = x.to(device), y.to(device)
        total += _layer_loss(layer, x, y).item() * len(x)
        count += len(x)
    return total / max(count, 1)


@torch.no_grad()
def init_input_range(layer: QModuleMixin, cache: IOCache, method: str, seed: int) -> None:
    """Input quantizer range from the cached layer inputs."""
    q = layer.input_quantizer
    if q is None:
        return
    observer = RangeObserver(seed=seed)
    for x, _ in cache.iterate(256):
        observer.update(x)
    q.set_range(*observer.compute(method, bits=q.bits, symmetric=q.symmetric))


def _param_groups(layer: QModuleMixin, config: AdaQuantConfig) -> list[dict]:
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    w_step = wq.scale.detach().mean().item()
    groups = [
        {"params": [layer.weight], "lr": config.lr_weight * w_step},
        {"params": [layer.bias], "lr": config.lr_bias},
        {"params": [wq.scale], "lr": config.lr_weight_scale * w_step},
    ]
    if not wq.symmetric:
        groups.append({"params": [wq.zero_point], "lr": config.lr_zero_point})
    if iq is not None:
        groups.append({"params": [iq.scale], "lr": config.lr_act_scale * iq.scale.detach().mean().item()})
        if not iq.symmetric:
            groups.append({"params": [iq.zero_point], "lr": config.lr_zero_point})
    return [g for g in groups if g["lr"] > 0]


def optimize_layer(
    layer: QModuleMixin, cache: IOCache, config: AdaQuantConfig, generator: torch.Generator, name: str = ""
) -> LayerReport:
    """Initialise ``layer``'s ranges from ``cache``, then run AdaQuant on it in place.

    The learning rates follow a cosine decay and the best state among a few checkpoints (the range
    initialisation included) is kept, so the result is never worse than the initialisation on the evaluated
    samples.
    """
    start = time.perf_counter()
    init_weight_range(layer, config.weight_range_method)
    init_input_range(layer, cache, config.activation_range_method, seed=config.seed)
    mse_before = _evaluate(layer, cache, config.batch_size)
    best_mse, best_state = mse_before, copy.deepcopy(layer.state_dict())
    original_weight = layer.weight.detach().clone()
    groups = _param_groups(layer, config)
    # Same work per step for every layer: early layers with big feature maps take fewer samples per step.
    per_sample = cache.output_size_per_sample()
    step_batch = max(1, min(config.batch_size, config.max_step_elements // per_sample))
    # The layer loss can turn back up after a few dozen steps (W' starts to overfit the cache): decay the
    # learning rates and keep the best state seen at a few checkpoints.
    checkpoint_every = max(1, config.iterations // 5)
    if config.iterations > 0 and groups:
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
        for step in range(1, config.iterations + 1):
            layer.train()
            x, y = cache.sample(step_batch, generator)
            x, y = x.to(layer.weight.device), y.to(layer.weight.device)
            loss = _layer_loss(layer, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if config.weight_deviation_limit is not None:
                _limit_weight_deviation(layer, original_weight, config.weight_deviation_limit)
            if step % checkpoint_every == 0 or step == config.iterations:
                layer.eval()
                mse = _evaluate(layer, cache, config.batch_size)
                if mse < best_mse:  # NaN never wins
                    best_mse, best_state = mse, copy.deepcopy(layer.state_dict())
    layer.eval()
    for p in layer.parameters():
        p.grad = None
    layer.load_state_dict(best_state)
    mse_after = best_mse
    abits = None if layer.input_quantizer is None else layer.input_quantizer.bits
    return LayerReport(name, layer.weight_quantizer.bits, abits, mse_before, mse_after,
                       time.perf_counter() - start, cache.num_samples)


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


def run_adaquant(
    qmodel: nn.Module,
    fp_model: nn.Module,
    layer_names: Sequence[str],
    batches: Sequence[Batch],
    config: AdaQuantConfig,
    layer_bytes: dict[str, int] | None = None,
) -> list[LayerReport]:
    """AdaQuant over ``layer_names`` (execution order) of ``qmodel``; ``fp_model`` gives inputs/targets.

    ``layer_bytes`` (estimated cache size per layer) lets the parallel variant capture several layers per pass.
    """
    reports: list[LayerReport] = []
    dtype = torch.float16 if config.cache_dtype == "float16" else torch.float32
    index = {name: i for i, name in enumerate(layer_names)}
    if config.variant == "parallel":
        groups = _parallel_groups(layer_names, layer_bytes, config.max_cache_bytes)
    else:
        groups = [[name] for name in layer_names]
    bar = tqdm(total=len(layer_names), desc=f"AdaQuant ({config.variant})", disable=not config.progress)
    for group in groups:
        if config.variant == "parallel":
            caches = capture_layers_io(fp_model, group, batches, dtype=dtype, max_bytes=config.max_cache_bytes)
        for name in group:
            layer = qmodel.get_submodule(name)
            if config.variant == "parallel":
                cache = caches.pop(name)
            else:
                cache = capture_layer_io(qmodel, fp_model, name, batches, dtype=dtype,
                                         max_bytes=config.max_cache_bytes)
            try:
                report = optimize_layer(layer, cache, config, make_generator(config.seed, index[name]), name=name)
            finally:
                cache.cleanup()
            reports.append(report)
            bar.update(1)
            bar.set_postfix_str(f"{name} mse {report.mse_before:.3g}->{report.mse_after:.3g}")
            _logger.debug("%s", report)
    bar.close()
    return reports
