"""Tracing for ``export_onnx``: each quantized layer's weight and input quantizer stand in as symbolic
``DequantizeLinear`` / ``QuantizeLinear`` nodes (``torch.onnx.ops.symbolic``) while ``torch.onnx.export``
(``dynamo=True``) traces the model; the model is restored afterwards."""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Iterator

import onnx
import torch
from torch import nn

from ..nn import QModuleMixin
from ..quant import Quantizer
from .encodings import ActivationEncoding, ExportError, WeightEncoding
from .graph import QUANTIZER_KEY, quantizer_tag

__all__ = ["eager_attention", "evaluating", "export_mode", "trace"]


def _symbolic_weight(layer: QModuleMixin, tag: str, enc: WeightEncoding, opset: int) -> torch.Tensor:
    # Placeholder inputs, replaced by attach_encodings: the layer's own weight (or packed codes) and quantizer
    # parameters, so the exporter can merge two of these nodes only when they hold the same values.
    wq = layer.weight_quantizer
    weight = layer._parameters.get("weight")
    weight = layer._buffers["weight_packed"] if weight is None else weight  # frozen layer
    return torch.onnx.ops.symbolic("DequantizeLinear", (weight, wq.scale, wq.zero_point), {"axis": 0},
                                   dtype=torch.float32, shape=tuple(enc.codes.shape), version=opset,
                                   metadata_props={QUANTIZER_KEY: tag})


def _symbolic_activation(x: torch.Tensor, iq: Quantizer, tag: str, enc: ActivationEncoding,
                         opset: int) -> torch.Tensor:
    """``QuantizeLinear -> DequantizeLinear`` of an activation (a layer's input, or its output) on ``iq``'s grid."""
    if enc.clip is not None:
        x = torch.clamp(x, *enc.clip)
    q = torch.onnx.ops.symbolic("QuantizeLinear", (x, iq.scale, iq.zero_point), {},
                                dtype=getattr(onnx.TensorProto, enc.type.name), shape=x.shape, version=opset,
                                metadata_props={QUANTIZER_KEY: tag})
    return torch.onnx.ops.symbolic("DequantizeLinear", (q, iq.scale, iq.zero_point), {}, dtype=torch.float32,
                                   shape=x.shape, version=opset, metadata_props={QUANTIZER_KEY: tag})


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then each module's own training flag back."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in training.items():
            module.training = flag


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """A transformers model's attention as its ``"eager"`` implementation for the duration, then its own back.

    Why: ``torch.onnx`` exports ``scaled_dot_product_attention`` with a mask as the attention plus ``IsNaN`` /
    ``Where`` guards over every (batch, head, query, key) score, which cost onnxruntime about a fifth of MiniLM's
    run time at 384 tokens; the eager attention exports as ``MatMul -> Add(mask) -> Softmax -> MatMul``. Both compute
    the same values up to float summation order. Models without transformers' attention switch are left alone.
    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if current in (None, "eager") or switch is None:
        yield
        return
    switch("eager")
    try:
        yield
    finally:
        switch(current)


@contextlib.contextmanager
def export_mode(layers: dict[str, QModuleMixin], weights: dict[str, WeightEncoding],
                inputs: dict[str, ActivationEncoding], opset: int, traced: set[str],
                outputs: dict[str, ActivationEncoding] | None = None) -> Iterator[None]:
    """Route each layer's quantizers to symbolic ONNX nodes (instance attributes over the class's methods);
    the model is restored afterwards, whatever happens. ``outputs``: the layers with an output quantizer."""
    outputs = outputs or {}

    def weight_hook(name: str, layer: QModuleMixin) -> Any:
        def quantized_weight() -> torch.Tensor:
            traced.add(quantizer_tag(name, "weight"))
            return _symbolic_weight(layer, quantizer_tag(name, "weight"), weights[name], opset)
        return quantized_weight

    def input_hook(name: str, layer: QModuleMixin) -> Any:
        def quantize_input(x: torch.Tensor) -> torch.Tensor:
            traced.add(quantizer_tag(name, "input"))
            return _symbolic_activation(x, layer.input_quantizer, quantizer_tag(name, "input"), inputs[name], opset)
        return quantize_input

    def output_hook(name: str, layer: QModuleMixin) -> Any:
        # after the layer's Conv/Gemm node and its bias: where onnxruntime looks for the requantization
        def quantize_output(y: torch.Tensor) -> torch.Tensor:
            traced.add(quantizer_tag(name, "output"))
            return _symbolic_activation(y, layer.output_quantizer, quantizer_tag(name, "output"), outputs[name],
                                        opset)
        return quantize_output

    try:
        for name, layer in layers.items():
            layer.quantized_weight = weight_hook(name, layer)
            if name in inputs:
                layer.quantize_input = input_hook(name, layer)
            if name in outputs:
                layer.quantize_output = output_hook(name, layer)
        yield
    finally:
        for layer in layers.values():
            for method in ("quantized_weight", "quantize_input", "quantize_output"):
                layer.__dict__.pop(method, None)


def trace(qmodel: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], opset: int,
           dynamic_shapes: Any, output_names: list[str] | None) -> "onnx.ModelProto":
    # torch.onnx prints progress and warns about its own internals; keep the user's console clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(qmodel, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, output_names=output_names, verbose=False,
                                        external_data=False)
        except Exception as exc:
            raise ExportError(f"torch.onnx could not export the model ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:500]})") from exc
    return program.model_proto

