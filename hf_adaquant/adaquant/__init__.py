"""AdaQuant: layer-wise optimisation of weights, biases and quantization steps."""

from .capture import capture_layer_io
from .iocache import IOCache
from .layerwise import LayerReport, optimize_layer
from .runner import run_adaquant

__all__ = ["IOCache", "LayerReport", "capture_layer_io", "optimize_layer", "run_adaquant"]
