"""hf_adaquant: post-training quantization with AdaQuant (Hubara et al., 2021) for Hugging Face models."""

# The public config: the core one (hf_adaquant.config) with transformers' mixin and the quantize-on-load section.
from .integrations.transformers_config import AdaQuantConfig
from .integrations import timm as _timm_layers  # noqa: F401  (registers quantized timm layers)
from .prepare import PreparedModel, prepare_model
from .quantize import quantize
from .report import QuantizationReport
from .serialization import load_quantized, save_quantized
from .export import ExportError, export_onnx, freeze
from .integrations import transformers as _transformers_registration  # noqa: F401,E402  (registers "adaquant")
from .integrations import hub_methods as _hub_methods  # noqa: F401  (Hub methods on timm/plain models)
from .quantizer import AdaQuantQuantizer
from .utils.logging import get_verbosity, set_verbosity

from .version import __version__  # noqa: E402

__all__ = ["AdaQuantConfig", "AdaQuantQuantizer", "ExportError", "PreparedModel", "QuantizationReport", "__version__",
           "export_onnx", "freeze", "get_verbosity", "load_quantized", "prepare_model", "quantize", "save_quantized",
           "set_verbosity"]
