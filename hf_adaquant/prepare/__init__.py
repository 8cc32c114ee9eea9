"""Model preparation: fold BatchNorm, find the quantizable layers, swap in quantized modules."""

from .find_layers import LayerInfo, plan_layer_bits, trace_layers
from .fold_bn import FoldResult, fold_batchnorms
from .model import PreparedModel, prepare_model

__all__ = ["FoldResult", "LayerInfo", "PreparedModel", "fold_batchnorms", "plan_layer_bits", "prepare_model",
           "trace_layers"]
