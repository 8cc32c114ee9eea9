"""Quantized modules: float layers wrapped with weight and input quantizers."""

from .qconv import QConv2d
from .qlinear import QLinear
from .qmodule import QMODULES, QModuleMixin, quantize_module, register_qmodule

__all__ = ["QMODULES", "QConv2d", "QLinear", "QModuleMixin", "quantize_module", "register_qmodule"]
