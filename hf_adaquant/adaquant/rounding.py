"""Learned rounding: AdaQuant's W' restricted to "round up or down" (AdaRound-style) for very low weight bits.

Free W' (the paper's AdaQuant) has as many continuous degrees of freedom as the layer has weights; at 2-3 bit weights
it fits the calibration cache instead of the data (see docs/ALGORITHM.md). Here each weight may only take the grid
point below or above ``W / s``: a continuous relaxation ``h(alpha)`` in ``[0, 1]`` is learned on the same layer MSE,
with a regulariser that pushes every ``h`` to 0 or 1 as its exponent ``beta`` anneals, and is then hard-rounded.
The weight step is frozen while rounding is learned (the floor depends on it); bias and input steps still train.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quant import Quantizer

__all__ = ["LearnedRounding"]

_ZETA, _GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid, so h reaches exactly 0 and 1


class LearnedRounding(nn.Module):
    """Rounding choices of one weight tensor on a fixed per-channel grid.

    Args:
        weight: the float weight ``W`` (kept as the floor ``floor(W / s)`` and a learnable ``alpha``).
        quantizer: the layer's weight quantizer; its current step and zero-point define the grid.
    """

    def __init__(self, weight: torch.Tensor, quantizer: Quantizer) -> None:
        super().__init__()
        with torch.no_grad():
            scale = quantizer.broadcast(quantizer.step(), weight).detach().clone()
            zero_point = torch.round(quantizer.broadcast(quantizer.zero_point, weight)).detach().clone()
            scaled = weight.detach() / scale
            floor = torch.floor(scaled)
            # Start at the float position: h(alpha) = frac(W / s), i.e. no rounding decision made yet.
            rest = (scaled - floor).clamp(0.01, 0.99)
            alpha = -torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)
        self.register_buffer("floor", floor)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.qmin, self.qmax = quantizer.qmin, quantizer.qmax
        self.alpha = nn.Parameter(alpha)
        self.hard = False

    def soft(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)

    def forward(self) -> torch.Tensor:
        """The quantized weight: soft rounding while training, hard (alpha >= 0 rounds up) when ``hard``."""
        up = (self.alpha >= 0).to(self.alpha.dtype) if self.hard else self.soft()
        q = torch.clamp(self.floor + up + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        """Mean of ``1 - |2h - 1|^beta``: 0 when every weight has picked a side, ~1 while undecided."""
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).mean()

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """Float weight whose round-to-nearest quantization gives the learned codes (grid points themselves)."""
        hard, self.hard = self.hard, True
        try:
            return self.forward().detach().clone()
        finally:
            self.hard = hard


def annealed_beta(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """Regulariser exponent at ``step``: None during warm-up (no regularisation), then cosine from start to end."""
    begin = int(warmup * total)
    if step < begin:
        return None
    progress = (step - begin) / max(1, total - begin)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))
