"""Export a saved checkpoint folder to ONNX (``hf-adaquant export``): reload it, make example inputs, export."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..serialization import load_quantized
from .encodings import ExportError
from .onnx import export_onnx, file_opset

__all__ = ["example_inputs_for", "export_checkpoint"]

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _forward_parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def example_inputs_for(model: nn.Module, input_shape: tuple[int, ...] | None = None, *, batch_size: int = 2,
                       sequence_length: int = 16) -> Any:
    """Example inputs that fit a reloaded model: ``input_shape`` (one sample) when given; else the timm model's
    ``pretrained_cfg["input_size"]``, or a transformers model's token inputs (its forward's names) or images.

    Raises:
        ExportError: the shape cannot be inferred (a plain PyTorch model): pass ``input_shape``.
    """
    if input_shape is not None:
        if not input_shape or not all(isinstance(n, int) and n > 0 for n in input_shape):
            raise ExportError(f"input shape must be positive integers, got {input_shape!r}")
        return torch.randn(batch_size, *input_shape)
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return torch.randn(batch_size, *cfg["input_size"])
    config = getattr(model, "config", None)
    params = _forward_parameters(model)
    if config is not None and "input_ids" in params and getattr(config, "vocab_size", None):
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(config.vocab_size), (batch_size, sequence_length), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        return {name: inputs[name] for name in _TEXT_INPUTS if name in params}
    if config is not None and "pixel_values" in params and getattr(config, "image_size", None):
        size = config.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        return {"pixel_values": torch.randn(batch_size, getattr(config, "num_channels", 3), *size)}
    raise ExportError(f"cannot tell the input shape of a {type(model).__name__}: pass the shape of one sample "
                      "(--input-shape C,H,W)")


def export_checkpoint(directory: str | os.PathLike, output: str | os.PathLike, *, model: nn.Module | None = None,
                      input_shape: tuple[int, ...] | None = None, opset: int | None = None,
                      op_style: str = "fused") -> dict[str, Any]:
    """Reload the checkpoint in ``directory`` and export it to ``output`` (see :func:`export_onnx`).

    Args:
        model: float skeleton for plain PyTorch checkpoints (as for :func:`hf_adaquant.load_quantized`).
        input_shape: the shape of one input sample, where the model does not say it (plain PyTorch models).
        opset / op_style: as for :func:`export_onnx`.

    Returns:
        A summary: output path, opset, file sizes.
    """
    directory = Path(directory)
    qmodel = load_quantized(directory, model=model)
    path = export_onnx(qmodel, output, example_inputs_for(qmodel, input_shape), opset=opset,
                       op_style=op_style)
    return {"output": str(path), "opset": file_opset(path), "onnx_bytes": path.stat().st_size,
            "checkpoint_bytes": sum(p.stat().st_size for p in directory.glob("*.safetensors"))}
