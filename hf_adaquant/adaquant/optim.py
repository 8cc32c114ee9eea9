"""The optimisation step shared by layer and block reconstruction: loss, Adam groups, per-channel moves, best state.

:func:`~hf_adaquant.adaquant.layerwise.optimize_layer` trains one layer on its own output,
:func:`~hf_adaquant.adaquant.block.optimize_block` the layers of one block on the block's output; both train the
same parameters at the same rates and keep the best state they evaluated with the same rules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import AdaQuantConfig
from ..nn import QModuleMixin
from .rounding import LearnedRounding

__all__ = ["AUTO_LEARNED_ROUNDING_MAX_BITS", "PerChannelSteps", "improves", "layer_loss", "limit_weight_deviation",
           "loss_scale", "param_groups", "state_without_rounding", "uses_learned_rounding"]

# weight_rounding="auto": free W' (the paper's) down to 4 bits, learned rounding at 2-3 bits where free W'
# overfits (ResNet-20 W2A4: 82.8 free vs 88.5 learned, benchmarks/results/core_resnet20_w2_learned.json).
AUTO_LEARNED_ROUNDING_MAX_BITS = 3


def uses_learned_rounding(config: AdaQuantConfig, weight_bits: int) -> bool:
    """Whether a layer with ``weight_bits``-bit weights learns up/down rounding (rather than a free ``W'``)."""
    return config.weight_rounding == "learned" or (
        config.weight_rounding == "auto" and weight_bits <= AUTO_LEARNED_ROUNDING_MAX_BITS)


def layer_loss(layer: QModuleMixin, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MSE of ``layer(x)`` to the FP output ``y``, both after the layer's fused output activation (if any)."""
    out = layer(x)
    return F.mse_loss(layer.apply_output_activation(out), layer.apply_output_activation(y))


def improves(mse: float, best: float) -> bool:
    """``mse < best`` where a NaN or infinite loss is worse than any finite one (plain ``<`` is False with NaN)."""
    if not math.isfinite(mse):
        return False
    return not math.isfinite(best) or mse < best


def loss_scale(mse_before: float) -> float:
    """Divisor that makes the learned-rounding loss relative; 1 when the initial loss is zero or not finite."""
    return max(mse_before, 1e-12) if math.isfinite(mse_before) else 1.0


class PerChannelSteps:
    """Scale each output channel's Adam move of ``W'`` and of its weight step by that channel's own step.

    Adam moves every element by about ``lr`` per iteration whatever its gradient, so ``lr_weight`` and
    ``lr_weight_scale`` are given in units of a quantization step. Folded BatchNorms leave per-channel steps tens
    of times apart (EfficientNet-Lite0: up to 20x above the median): one layer-wide step would all but freeze the
    wide channels and shake the narrow ones.

    Call :meth:`before_step` right before and :meth:`after_step` right after ``optimizer.step()``.
    """

    def __init__(self, layer: QModuleMixin) -> None:
        self.weight, self.scale = layer.weight, layer.weight_quantizer.scale
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None

    def before_step(self) -> None:
        """Remember ``W'`` and the weight step as they are before the optimiser moves them."""
        self._saved = (self.weight.detach().clone(), self.scale.detach().clone())

    @torch.no_grad()
    def after_step(self) -> None:
        """Rescale the optimiser's move of ``W'`` and of the weight step by each channel's step before it."""
        weight_before, scale_before = self._saved
        step = scale_before.abs().reshape(-1, *[1] * (self.weight.dim() - 1))  # per channel (or one per tensor)
        self.weight.copy_(weight_before + (self.weight - weight_before) * step)
        self.scale.copy_(scale_before + (self.scale - scale_before) * scale_before.abs())


def param_groups(layer: QModuleMixin, config: AdaQuantConfig, rounding: LearnedRounding | None) -> list[dict]:
    """Adam groups. ``W'`` and the weight step use unit-free rates, rescaled per channel by :class:`PerChannelSteps`.

    With ``rounding`` the weight grid is frozen and only its up/down choices (``rounding.alpha``) are learned.
    Groups whose rate is 0 are left out.
    """
    wq = layer.weight_quantizer
    groups = [{"params": [layer.bias], "lr": config.lr_bias}]
    if rounding is not None:  # the grid is frozen: only the up/down choices of the weights are learned
        groups.append({"params": [rounding.alpha], "lr": config.lr_rounding})
    else:
        groups += [{"params": [layer.weight], "lr": config.lr_weight},
                   {"params": [wq.scale], "lr": config.lr_weight_scale}]
        if not wq.symmetric:
            groups.append({"params": [wq.zero_point], "lr": config.lr_zero_point})
    for q in layer.activation_quantizers().values():  # the input's grid, and the output's where there is one
        groups.append({"params": [q.scale], "lr": config.lr_act_scale * q.scale.detach().mean().item()})
        if not q.symmetric:
            groups.append({"params": [q.zero_point], "lr": config.lr_zero_point})
    return [g for g in groups if g["lr"] > 0]


def state_without_rounding(layer: QModuleMixin) -> dict[str, torch.Tensor]:
    """A copy of ``layer``'s state dict without its (temporary) learned-rounding entries: a candidate best state."""
    return {k: v.detach().clone() for k, v in layer.state_dict().items() if not k.startswith("weight_rounding.")}


@torch.no_grad()
def limit_weight_deviation(layer: QModuleMixin, original: torch.Tensor, limit: float) -> None:
    """Keep ``W'`` within ``limit`` weight steps of ``W``: fewer effective degrees of freedom at low bits."""
    step = layer.weight_quantizer.scale.detach().clamp(min=1e-8).reshape(-1, *[1] * (original.dim() - 1))
    layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, original + limit * step), original - limit * step))
