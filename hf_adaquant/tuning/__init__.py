"""Post-quantization tuning: BatchNorm re-estimation, bias correction and bias tuning."""

from .bias import correct_bias, tune_bias
from .bn import tune_batchnorm

__all__ = ["correct_bias", "tune_bias", "tune_batchnorm"]
