"""Post-quantization tuning: BatchNorm re-estimation, bias correction and bias tuning."""

from .bias import activation_elements_per_sample, correct_bias, tune_bias
from .bn import tune_batchnorm

__all__ = ["activation_elements_per_sample", "correct_bias", "tune_bias", "tune_batchnorm"]
