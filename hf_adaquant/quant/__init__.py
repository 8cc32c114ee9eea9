"""Numbers: fake quantization, quantizer modules and range initialisation."""

from .functional import fake_quantize, qrange, round_ste
from .quantizer import Quantizer
from .ranges import RANGE_METHODS, NonFiniteValuesError, RangeObserver, compute_range, register_range_method

__all__ = [
    "RANGE_METHODS",
    "NonFiniteValuesError",
    "Quantizer",
    "RangeObserver",
    "compute_range",
    "fake_quantize",
    "qrange",
    "register_range_method",
    "round_ste",
]
