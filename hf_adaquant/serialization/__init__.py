"""Compact quantized checkpoints: packed integer codes in safetensors plus ``quantization_config`` in config.json."""

from .checkpoint import CheckpointError as CheckpointError
from .checkpoint import load_quantized as load_quantized
from .checkpoint import save_quantized as save_quantized
from .layout import LAYOUT_VERSION as LAYOUT_VERSION
from .layout import WEIGHTS_NAME as WEIGHTS_NAME
from .pack import pack_codes as pack_codes
from .pack import packed_nbytes as packed_nbytes
from .pack import unpack_codes as unpack_codes

__all__ = ["LAYOUT_VERSION", "WEIGHTS_NAME", "CheckpointError", "load_quantized", "pack_codes", "packed_nbytes",
           "save_quantized", "unpack_codes"]
