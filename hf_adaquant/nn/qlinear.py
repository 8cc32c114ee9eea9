"""Quantized ``nn.Linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .qmodule import QModuleMixin, copy_weight_and_bias, register_qmodule

__all__ = ["QLinear"]


@register_qmodule(nn.Linear)
class QLinear(QModuleMixin, nn.Linear):
    """``nn.Linear`` whose input and weights pass through fake quantizers."""

    @classmethod
    def from_float(cls, module: nn.Linear, weight_bits: int, activation_bits: int | None, *,
                   weight_symmetric: bool = False, activation_symmetric: bool = False) -> "QLinear":
        q = cls(module.in_features, module.out_features, bias=True, device=module.weight.device,
                dtype=module.weight.dtype)
        copy_weight_and_bias(q, module)
        q._init_quantizers(weight_bits, activation_bits, weight_symmetric, activation_symmetric)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(F.linear(self.quantize_input(x), self.quantized_weight(), self.bias))
