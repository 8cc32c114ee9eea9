"""Deployable quantized models: ONNX files with integer weights (:func:`export_onnx`) and PyTorch models that keep
packed integer weights in memory (:func:`freeze`, kept beside the checkpoint format it shares)."""

from ..serialization.packed import freeze, is_frozen
from .encodings import ExportError
from .from_checkpoint import example_inputs_for, export_checkpoint
from .onnx import export_onnx

__all__ = ["ExportError", "example_inputs_for", "export_checkpoint", "export_onnx", "freeze", "is_frozen"]
