"""Block reconstruction (BRECQ, Li et al. 2021) with dropped activation quantization (QDrop, Wei et al. 2022).

AdaQuant fits each layer's output on its own. Here every quantized layer of one stage of the staged engine (a
residual block, a transformer layer) is optimised jointly, with the parameters AdaQuant trains per layer (``W'``
or learned rounding, weight and input steps, biases: the Adam groups and rates of
:func:`~hf_adaquant.adaquant.optim.param_groups`), on the MSE of the block's output against the FP block's output.
The block's inputs are the quantized model's stage boundary (the quantized prefix, as optimised so far), its
targets the FP block run on the FP boundary (:meth:`~hf_adaquant.adaquant.staged.StagedRunner.fp_block_outputs`).

With ``activation_drop = p`` each element of each layer input is left in float with probability ``p`` during the
optimisation steps (QDrop); evaluations and the final model quantize every element.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..calibrate import init_weight_range
from ..config import AdaQuantConfig
from ..nn import QModuleMixin
from .evaluation import EVAL_SAMPLES
from .layerwise import LayerReport
from .optim import (PerChannelSteps, improves, limit_weight_deviation, loss_scale, param_groups,
                    state_without_rounding, uses_learned_rounding)
from .ranges import init_input_range, init_output_range
from .rounding import LearnedRounding, annealed_beta
from .staged import StagedRunner

__all__ = ["drop_inputs", "optimize_block"]


def _dropped_input(quantizer: nn.Module, p: float, generator: torch.Generator, x: torch.Tensor) -> torch.Tensor:
    # The mask is drawn on the CPU from the block's own stream: the same masks on any device, any run.
    keep = torch.rand(x.shape, generator=generator) >= p  # quantized with probability 1 - p
    return torch.where(keep.to(x.device), quantizer(x), x)


@contextmanager
def drop_inputs(layers: Mapping[str, QModuleMixin], p: float, generator: torch.Generator) -> Iterator[None]:
    """Within the context each layer's input quantization is dropped element-wise with probability ``p``.

    The layers' own forwards are left alone: their ``quantize_input`` is shadowed by an instance attribute,
    removed on exit (the state dict never changes). ``p=0`` quantizes every element, ``p=1`` none.
    """
    wrapped = []
    try:
        for layer in layers.values():
            if layer.input_quantizer is not None:
                layer.quantize_input = lambda x, q=layer.input_quantizer: _dropped_input(q, p, generator, x)
                wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            del layer.quantize_input


def _drop_context(layers: Mapping[str, QModuleMixin], p: float, generator: torch.Generator):
    """:func:`drop_inputs` when ``p > 0``; at 0 nothing is wrapped (every element is quantized anyway)."""
    return drop_inputs(layers, p, generator) if p > 0 else nullcontext()


def _output(out: Any) -> torch.Tensor:
    """The tensor the next block chains on: the block's output, or its first tensor (hidden states)."""
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise TypeError(f"the block returned no tensor ({type(out).__name__})")


def _rows(tree: Any, n: int, rows: torch.Tensor) -> Any:
    """Samples ``rows`` of every tensor in ``tree`` whose first dimension is the batch (``n``)."""
    def take(v: Any) -> Any:
        return v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
    return pytree.tree_map(take, tree)


class _BlockData:
    """Block ``i``'s quantized inputs and FP targets on every calibration batch (the staged runner's stores)."""

    def __init__(self, staged: StagedRunner, i: int, device: torch.device | None) -> None:
        self.staged, self.i, self.device = staged, i, device
        self.targets = staged.fp_block_outputs(i)
        self.sizes = [int(_output(self.targets.get(k)).shape[0]) for k in range(len(staged.batches))]

    def get(self, index: int) -> tuple[tuple, dict, torch.Tensor]:
        args, kwargs = self.staged.block_inputs(self.i, index, self.device)
        return args, kwargs, _output(self.targets.get(index, self.device)).float()


def _forward(block: nn.Module, args: tuple, kwargs: dict, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(_output(block(*args, **kwargs)).float(), target)


@torch.no_grad()
def _evaluate(block: nn.Module, data: _BlockData) -> float:
    total, count = 0.0, 0
    for index, n in enumerate(data.sizes):
        if count >= EVAL_SAMPLES:  # as layerwise: at most this many calibration samples
            break
        args, kwargs, target = data.get(index)
        total += float(_forward(block, args, kwargs, target)) * n
        count += n
    return total / max(count, 1)


def _states(layers: Mapping[str, QModuleMixin]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: state_without_rounding(layer) for name, layer in layers.items()}


def optimize_block(
    block: nn.Module,
    layers: Mapping[str, QModuleMixin],
    staged: StagedRunner,
    stage: int,
    config: AdaQuantConfig,
    generator: torch.Generator,
    drop_generator: torch.Generator,
    name: str = "",
) -> list[LayerReport]:
    """Initialise the ranges of ``layers`` (the quantized layers of block ``stage``, execution order), then
    optimise them jointly on the block-output MSE, in place.

    Ranges are initialised layer after layer on each one's inputs in the quantized model, as AdaQuant does. Adam
    runs ``config.iterations`` steps with a cosine decay, one calibration batch (at most ``config.batch_size``
    of its samples, fewer past ``max_step_elements`` output values) per step; the best state among a few
    checkpoints, the range initialisation included, is kept. Every layer's report holds the block's MSE.
    """
    start = time.perf_counter()
    block.eval()
    for layer_name, layer in layers.items():  # a layer's range sees the earlier layers of the block quantized
        init_weight_range(layer, config.weight_range_method, layer_name)
        cache = staged.capture(layer_name)
        try:
            init_input_range(layer, cache, config.activation_range_method, seed=config.seed, name=layer_name)
            init_output_range(layer, cache, config.activation_range_method, seed=config.seed, name=layer_name)
        finally:
            cache.cleanup()
    device = next(iter(layers.values())).weight.device
    data = _BlockData(staged, stage, device)
    mse_before = _evaluate(block, data)
    best_mse, best_state = mse_before, _states(layers)
    originals = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    roundings: dict[str, LearnedRounding] = {}
    for layer_name, layer in layers.items():
        bits = layer.weight_quantizer.bits
        if config.iterations > 0 and uses_learned_rounding(config, bits):
            roundings[layer_name] = layer.weight_rounding = LearnedRounding(layer.weight, layer.weight_quantizer)
    groups = [g for n, layer in layers.items() for g in param_groups(layer, config, roundings.get(n))]
    per_sample = max(1, _output(data.targets.get(0)).numel() // max(data.sizes[0], 1))
    step_batch = max(1, min(config.batch_size, config.max_step_elements // per_sample))
    checkpoint_every = max(1, config.iterations // 5)
    try:
        if config.iterations > 0 and groups:
            optimizer = torch.optim.Adam(groups)
            per_channel = [PerChannelSteps(layer) for n, layer in layers.items() if n not in roundings]
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.iterations)
            for step in range(1, config.iterations + 1):
                for layer in layers.values():
                    layer.train()
                index = int(torch.randint(len(data.sizes), (1,), generator=generator))
                args, kwargs, target = data.get(index)
                n = data.sizes[index]
                if n > step_batch:
                    rows = torch.randperm(n, generator=generator)[:step_batch].sort().values
                    (args, kwargs), target = _rows((args, kwargs), n, rows), target[rows.to(target.device)]
                with _drop_context(layers, config.activation_drop, drop_generator):
                    loss = _forward(block, args, kwargs, target)
                beta = annealed_beta(step, config.iterations) if roundings else None
                if beta is not None:
                    # Each layer's regulariser weighs as in layer mode (against its own relative MSE there).
                    loss = loss / loss_scale(mse_before) + config.rounding_regularization * sum(
                        r.regularizer(beta) for r in roundings.values()) / len(roundings)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for p in per_channel:
                    p.before_step()
                optimizer.step()
                for p in per_channel:
                    p.after_step()
                schedule.step()
                if config.weight_deviation_limit is not None:
                    for n_, layer in layers.items():
                        if n_ not in roundings:
                            limit_weight_deviation(layer, originals[n_], config.weight_deviation_limit)
                if step % checkpoint_every == 0 or step == config.iterations:
                    best_mse, best_state = _checkpoint(block, layers, roundings, data, best_mse, best_state)
    finally:
        block.eval()
        for layer_name, layer in layers.items():
            if layer_name in roundings:
                del layer.weight_rounding
            for p in layer.parameters():
                p.grad = None
    for layer_name, layer in layers.items():
        layer.load_state_dict(best_state[layer_name])
    seconds = (time.perf_counter() - start) / len(layers)
    samples = sum(data.sizes)
    return [LayerReport(n, layer.weight_quantizer.bits, layer.activation_bits, mse_before, best_mse, seconds, samples)
            for n, layer in layers.items()]


def _checkpoint(block: nn.Module, layers: Mapping[str, QModuleMixin], roundings: Mapping[str, LearnedRounding],
                data: _BlockData, best_mse: float, best_state: dict) -> tuple[float, dict]:
    """Evaluate the current state as it will be used (hard-rounded, every input quantized); keep it if better."""
    block.eval()
    for r in roundings.values():
        r.hard = True
    try:
        mse = _evaluate(block, data)
        if improves(mse, best_mse):
            with torch.no_grad():
                for layer_name, r in roundings.items():
                    layers[layer_name].weight.copy_(r.hard_weight())
            best_mse, best_state = mse, _states(layers)
    finally:
        for r in roundings.values():
            r.hard = False
    return best_mse, best_state
