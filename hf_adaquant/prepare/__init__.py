"""Model preparation: fold BatchNorm, find the quantizable layers, swap in quantized modules."""

from .find_layers import LayerInfo, plan_layer_bits, trace_layers
from .fold_bn import FoldResult, fold_batchnorms

__all__ = ["FoldResult", "LayerInfo", "fold_batchnorms", "plan_layer_bits", "trace_layers"]
