"""Quantized ``nn.Conv2d`` (grouped and depthwise included)."""

from __future__ import annotations

import torch
from torch import nn

from .qmodule import QModuleMixin, copy_weight_and_bias, register_qmodule

__all__ = ["QConv2d"]


@register_qmodule(nn.Conv2d)
class QConv2d(QModuleMixin, nn.Conv2d):
    """``nn.Conv2d`` whose input and weights pass through fake quantizers."""

    @classmethod
    def from_float(cls, module: nn.Conv2d, weight_bits: int, activation_bits: int | None, *,
                   weight_symmetric: bool = False, activation_symmetric: bool = False) -> "QConv2d":
        padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
        q = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=padding,
                dilation=module.dilation, groups=module.groups, bias=True, padding_mode=module.padding_mode,
                device=module.weight.device, dtype=module.weight.dtype)
        copy_weight_and_bias(q, module)
        q._init_quantizers(weight_bits, activation_bits, weight_symmetric, activation_symmetric)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias))
