"""Save a quantized model as a compact checkpoint and load it back (transformers, timm or plain PyTorch).

A checkpoint directory holds ``config.json`` (the model's own config: transformers' or timm's, or ours for plain
modules, with ``quantization_config`` added) and ``adaquant_model.safetensors`` (packed codes + float tensors of
the layers left in float). Only safetensors is read: no pickle. The weights file carries a SHA-256 of its tensors
in its metadata so a corrupted file is reported, not loaded.

The two files are bound to each other: ``checkpoint_layout.weights_sha256`` in config.json is the weights file's
tensor digest, and the weights metadata holds a digest of the checkpoint layout (layers, bits, shapes, folded
BatchNorms). Files of different saves, or a config.json edited by hand, are refused on load instead of giving a
model whose bits do not match its codes. Checkpoints written before the binding (neither key) still load.

A save builds the whole folder next to the target and swaps it in atomically (the user's other files, e.g. a
tokenizer, are carried over); where the folder cannot be swapped (a mount point, a read-only parent) the files are
replaced one by one with config.json last, and the binding turns an interrupted save into a clear error on load.

The code lives in four modules, re-exported here (the public import path): :mod:`.weights` (the safetensors file
and its digests), :mod:`.checkpoint_config` (model kind, ``quantization_config``), :mod:`.save` and :mod:`.load`.
"""

from __future__ import annotations

from .checkpoint_config import model_kind, quantization_config_dict, read_checkpoint_config, validate_layout
from .load import (CheckpointLoader, attach_report, load_quantized, load_state_into_, register_checkpoint_loader,
                   register_load_finalizer, resolve_checkpoint_dir)
from .save import model_tensors, save_quantized
# _DIGEST_KEY / _LAYOUT_DIGEST_KEY: the weights metadata keys, imported from here by tests and scripts
from .weights import (_DIGEST_KEY, _LAYOUT_DIGEST_KEY, CONFIG_NAME, CheckpointError, check_weights_header,
                      layout_digest, read_weights, verify_layer_tensors, write_weights)

__all__ = ["CONFIG_NAME", "CheckpointError", "CheckpointLoader", "attach_report", "check_weights_header",
           "layout_digest", "load_quantized", "load_state_into_", "model_kind", "model_tensors",
           "quantization_config_dict", "read_checkpoint_config", "read_weights", "register_checkpoint_loader",
           "register_load_finalizer", "resolve_checkpoint_dir", "save_quantized", "validate_layout",
           "verify_layer_tensors", "write_weights"]
