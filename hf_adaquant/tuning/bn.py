"""BN tuning (BNT): re-estimate BatchNorm statistics of the quantized model, then fold again.

After each quantized conv that had a BatchNorm folded into it, a BatchNorm is re-inserted whose affine
parameters are the per-channel std and mean of the FP layer's output *measured on the calibration data* (the
folded BN's stored ``(|gamma|, beta)`` can be off by tens of percent on real data, which would pull the model away
from FP; they are only the fallback when no FP model is given). One pass in train
mode with ``momentum=None`` (a cumulative average over all calibration batches, unlike the reference's single
momentum-0.1 update) re-estimates the mean and variance of the *quantized* output; a second pass measures them
over the whole set, exactly as the targets were measured, and corrects what per-batch averaging missed. Folding rescales the weight
steps, so the integer weight codes stay exactly the same.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adaquant.cache import observe_outputs
from ..calibrate import qmodules
from ..nn import QConv2d
from ..utils.batches import Batch, call_model

__all__ = ["measure_output_stats", "tune_batchnorm"]

# Re-estimating a channel's statistics from fewer values than this (samples x positions) fits noise: such layers
# (tiny calibration sets, 1x1 feature maps) keep their folded statistics.
MIN_VALUES_PER_CHANNEL = 256


@torch.no_grad()
def measure_output_stats(
    fp_model: nn.Module, names: list[str], batches: Sequence[Batch]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel ``(std, mean)`` of each named conv's output in ``fp_model`` over ``batches`` (one pass)."""
    # Per batch: float32 var_mean (two-pass, cheap); across batches: Chan et al.'s pairwise merge in float64,
    # so neither a large mean nor thousands of batches cost precision.
    acc: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}  # name -> (mean, M2 = sum of squared deviations, n)

    def add(name: str, out: torch.Tensor) -> None:
        out = out.detach().float()
        var, mean = torch.var_mean(out, dim=[d for d in range(out.dim()) if d != 1], correction=0)
        n_b = out.numel() // out.shape[1]
        mean, m2 = mean.double().cpu(), var.double().cpu() * n_b
        if name not in acc:
            acc[name] = (mean, m2, n_b)
            return
        mean_a, m2_a, n_a = acc[name]
        n = n_a + n_b
        delta = mean - mean_a
        acc[name] = (mean_a + delta * (n_b / n), m2_a + m2 + delta.pow(2) * (n_a * n_b / n), n)

    observe_outputs(fp_model, names, batches, add)
    return {name: (m2.div(n).clamp(min=0).sqrt().float(), mean.float()) for name, (mean, m2, n) in acc.items()}


def _insert_bn(layer: QConv2d, target: tuple[torch.Tensor, torch.Tensor]) -> None:
    std, mean = target
    bn = nn.BatchNorm2d(layer.out_channels, momentum=None).to(layer.weight.device)
    with torch.no_grad():
        bn.weight.copy_(std)
        bn.bias.copy_(mean)
    layer.bn = bn


@torch.no_grad()
def _rescale_output(layer: QConv2d, factor: torch.Tensor, mean_from: torch.Tensor, mean_to: torch.Tensor) -> None:
    """Fold ``y -> (y - mean_from) * factor + mean_to`` into the layer, keeping its integer weight codes."""
    wq = layer.weight_quantizer
    codes = wq.int_codes(layer.weight)
    wq.scale.mul_(factor)
    # Put W' exactly on the rescaled grid so re-quantizing it reproduces the same integer codes.
    zp = torch.round(wq.zero_point).reshape(-1, 1, 1, 1)
    layer.weight.copy_((codes - zp) * wq.scale.reshape(-1, 1, 1, 1))
    layer.bias.copy_((layer.bias - mean_from) * factor + mean_to)


@torch.no_grad()
def _fold_bn(layer: QConv2d) -> None:
    bn = layer.bn
    layer.bn = None
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # > 0: the BN weight is a std
    _rescale_output(layer, factor, bn.running_mean, bn.bias)


@torch.no_grad()
def tune_batchnorm(
    model: nn.Module, batches: Sequence[Batch], *, fp_model: nn.Module | None = None, progress: bool = False
) -> list[str]:
    """Re-estimate and re-fold BN statistics of every quantized conv that had a folded BN. Returns their names.

    With ``fp_model`` (same layer names, float) the targets are the FP output statistics on ``batches``;
    without it, the folded BN's ``(|gamma|, beta)``.
    """
    layers = {n: m for n, m in qmodules(model).items() if isinstance(m, QConv2d) and m.bn_target is not None}
    if not layers:
        return []
    fp_model = fp_model.eval() if fp_model is not None else None
    counts: dict[str, int] = {}
    observe_outputs(model.eval(), list(layers), batches[:1],
                    lambda n, out: counts.__setitem__(n, out[0].numel() // out.shape[1] * out.shape[0]))
    total = len(batches)  # batches are of similar size: values per channel ~ first batch's count x batches
    layers = {n: m for n, m in layers.items() if counts.get(n, 0) * total >= MIN_VALUES_PER_CHANNEL}
    if not layers:
        return []
    targets = (measure_output_stats(fp_model, list(layers), batches) if fp_model is not None
               else {n: m.bn_target for n, m in layers.items()})
    was_training = model.training
    model.eval()
    for name, layer in layers.items():
        _insert_bn(layer, targets[name])
        layer.bn.train()  # only the re-inserted BNs use batch statistics; dropout etc. stay in eval
    try:
        for batch in tqdm(batches, desc="BN tuning", disable=not progress, leave=False):
            call_model(model, batch)
        for layer in layers.values():
            _fold_bn(layer)
        if fp_model is not None:
            # Train-mode BN averages per-batch statistics, which drift from whole-set statistics on small
            # batches or small feature maps; one more pass measures the quantized outputs exactly like the targets.
            measured = measure_output_stats(model, list(layers), batches)
            for name, layer in layers.items():
                (std_t, mean_t), (std_q, mean_q) = targets[name], measured[name]
                factor = torch.where(std_q > 1e-12, std_t / std_q.clamp(min=1e-12), torch.ones_like(std_q))
                _rescale_output(layer, factor.to(layer.bias.device), mean_q.to(layer.bias.device),
                                mean_t.to(layer.bias.device))
    finally:
        for layer in layers.values():
            layer.bn = None
        model.train(was_training)
    return list(layers)
