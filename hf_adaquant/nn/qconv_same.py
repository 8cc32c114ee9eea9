"""Quantized timm ``Conv2dSame`` (TF "SAME" padding, used by ``tf_*`` EfficientNets).

A quantized module like ``QConv2d``, so it lives in ``nn/`` where serialization and export (which pack and export
it) may import it; importing this module registers it for :func:`~hf_adaquant.nn.quantize_module`.
"""

from __future__ import annotations

import torch
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same

from .qmodule import QModuleMixin, copy_weight_and_bias, register_qmodule

__all__ = ["QConv2dSame"]


@register_qmodule(Conv2dSame)
class QConv2dSame(QModuleMixin, Conv2dSame):
    """Quantized ``Conv2dSame``: quantize the input, pad it TF-style (zero is on every grid), convolve."""

    @classmethod
    def from_float(cls, module: Conv2dSame, weight_bits: int, activation_bits: int | None, *,
                   weight_symmetric: bool = False, activation_symmetric: bool = False) -> "QConv2dSame":
        q = cls(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                dilation=module.dilation, groups=module.groups, bias=True, device=module.weight.device,
                dtype=module.weight.dtype)
        copy_weight_and_bias(q, module)
        q._init_quantizers(weight_bits, activation_bits, weight_symmetric, activation_symmetric)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(self.quantize_input(x), self.weight.shape[-2:], self.stride, self.dilation)
        return self.finish(self._conv_forward(x, self.quantized_weight(), self.bias))
