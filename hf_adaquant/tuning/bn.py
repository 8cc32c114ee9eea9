"""BN tuning (BNT): re-estimate the BatchNorm statistics of the quantized model, then fold again.

Every quantized conv that had a BatchNorm folded into it gets its output re-normalised per channel,
``y -> (y - mean_q) * std_t / std_q + mean_t``, where ``(std_q, mean_q)`` are the statistics of the quantized
layer's output and ``(std_t, mean_t)`` those of the FP layer's output, both *measured on the calibration data*
(the folded BN's stored ``(|gamma|, beta)`` can be off by tens of percent on real data, which would pull the model
away from FP; they are only the fallback when no FP model is given).

Each layer's quantized statistics must be measured with every earlier layer already re-normalised; otherwise
the corrections of a deep network are computed against inputs that then change, and the error grows with depth
(EfficientNet-Lite0 at W8A8 lost 5.7 top-1 points that way with one train-mode BN pass plus one global
correction). So the correction runs inside the forward pass: per calibration batch, one FP pass records the
targets, then one quantized pass whose hooks re-normalise each layer with the running (pooled over the batches so
far) statistics before the next layer runs. Folding rescales the weight steps, so the integer weight codes stay
exactly the same.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..adaquant.cache import observe_outputs
from ..calibrate import qmodules
from ..nn.qmodule import QModuleMixin
from ..utils.batches import Batch, call_model
from ..utils.hooks import hooks
from ..utils.logging import progress_bar
from ..utils.modules import eval_mode

__all__ = ["tune_batchnorm"]

# Re-estimating a channel's statistics from fewer values than this (samples x positions) fits noise: such layers
# (tiny calibration sets, 1x1 feature maps) keep their folded statistics.
MIN_VALUES_PER_CHANNEL = 256


class _ChannelStats:
    """Pooled per-channel mean and variance over batches of ``(N, C, ...)`` outputs.

    Per batch: float32 ``var_mean`` (two-pass, cheap); across batches: Chan et al.'s pairwise merge in float64,
    so neither a large mean nor thousands of batches cost precision.
    """

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None  # sum of squared deviations
        self.n = 0

    def add(self, out: torch.Tensor) -> None:
        out = out.detach().float()
        var, mean = torch.var_mean(out, dim=[d for d in range(out.dim()) if d != 1], correction=0)
        n_b = out.numel() // out.shape[1]
        mean, m2 = mean.double(), var.double() * n_b
        if self.mean is None:
            self.mean, self.m2, self.n = mean, m2, n_b
            return
        n = self.n + n_b
        delta = mean - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.n * n_b / n)
        self.n = n

    def std_mean(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.m2.div(self.n).clamp(min=0).sqrt(), self.mean


@torch.no_grad()
def _rescale_output(layer: QModuleMixin, factor: torch.Tensor, mean_from: torch.Tensor, mean_to: torch.Tensor) -> None:
    """Fold ``y -> (y - mean_from) * factor + mean_to`` into the layer, keeping its integer weight codes."""
    wq = layer.weight_quantizer
    codes = wq.int_codes(layer.weight)
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    wq.scale.mul_(factor.to(wq.scale.dtype).reshape(wq.scale.shape))
    # Put W' exactly on the rescaled grid so re-quantizing it reproduces the same integer codes.
    zp = torch.round(wq.zero_point).reshape(shape)
    layer.weight.copy_((codes - zp) * wq.scale.reshape(shape))
    layer.bias.copy_(((layer.bias.double() - mean_from) * factor + mean_to).to(layer.bias.dtype))


def _renormalisation(q: _ChannelStats, target: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(factor, mean_from, mean_to)`` taking the pooled quantized statistics to the target ones (float64)."""
    std_q, mean_q = q.std_mean()
    std_t, mean_t = (t.double().to(std_q.device) for t in target)
    # A channel that is constant in either model cannot be rescaled meaningfully (a zero factor would zero the
    # weight step): it only gets its mean moved.
    valid = (std_q > 1e-12) & (std_t > 1e-12)
    factor = torch.where(valid, std_t / std_q.clamp(min=1e-12), torch.ones_like(std_q))
    return factor, mean_q, mean_t


@torch.no_grad()
def tune_batchnorm(
    model: nn.Module, batches: Sequence[Batch], *, fp_model: nn.Module | None = None, progress: bool = False
) -> list[str]:
    """Re-estimate and re-fold BN statistics of every quantized conv that had a folded BN. Returns their names.

    With ``fp_model`` (same layer names, float) the targets are the FP output statistics on ``batches``;
    without it, the folded BN's ``(|gamma|, beta)``.
    """
    layers = {n: m for n, m in qmodules(model).items() if m.weight.dim() == 4 and m.bn_target is not None}
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
    names = list(layers)
    q_stats = {n: _ChannelStats() for n in names}
    fp_stats = {n: _ChannelStats() for n in names}
    fixed_targets = None if fp_model is not None else {n: m.bn_target for n, m in layers.items()}
    current: dict[str, tuple[torch.Tensor, ...]] = {}

    def renormalise(name: str, out: torch.Tensor) -> torch.Tensor:
        q_stats[name].add(out)  # the layer's own output, given the already re-normalised prefix
        target = fixed_targets[name] if fixed_targets is not None else fp_stats[name].std_mean()
        factor, mean_from, mean_to = current[name] = _renormalisation(q_stats[name], target)
        # Statistics and factors stay float64; the per-element transform runs in the output's dtype (hot path).
        shape = (1, -1) + (1,) * (out.dim() - 2)
        factor, mean_from, mean_to = (t.to(out.dtype).reshape(shape) for t in (factor, mean_from, mean_to))
        return (out - mean_from) * factor + mean_to

    renormalising = ((layers[n], lambda mod, args, out, n=n: renormalise(n, out)) for n in names)
    with hooks(renormalising), eval_mode(model):
        for batch in progress_bar(batches, desc="BN tuning", disable=not progress, leave=False):
            if fp_model is not None:
                observe_outputs(fp_model, names, [batch], lambda n, out: fp_stats[n].add(out))
            call_model(model, batch)
    for name, layer in layers.items():
        factor, mean_from, mean_to = (t.to(layer.bias.device) for t in current[name])
        _rescale_output(layer, factor, mean_from, mean_to)
    return names
