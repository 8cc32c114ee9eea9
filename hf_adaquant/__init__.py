"""hf_adaquant: post-training quantization with AdaQuant (Hubara et al., 2021) for Hugging Face models."""

from .config import AdaQuantConfig
from .integrations import timm as _timm_layers  # noqa: F401  (registers quantized timm layers)
from .quantize import PreparedModel, QuantizationReport, prepare_model, quantize

__version__ = "0.1.0"

__all__ = ["AdaQuantConfig", "PreparedModel", "QuantizationReport", "__version__", "prepare_model", "quantize"]
