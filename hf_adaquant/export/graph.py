"""Turn the exporter's graph into the deployable one: integer weight initializers, typed quantizer parameters.

During export every quantizer is traced as ``QuantizeLinear``/``DequantizeLinear`` nodes (``torch.onnx.ops.symbolic``)
whose inputs are placeholders (the quantizer's own float parameters) and whose metadata names the layer and the
tensor (:data:`QUANTIZER_KEY`). :func:`attach_encodings` gives each such node its real inputs (integer codes, float32
steps, integer zero-points, named after the layer) and removes the placeholders.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from .encodings import ActivationEncoding, ExportError, IntType, WeightEncoding
from .graph_index import attributes

__all__ = ["QUANTIZER_KEY", "add_biases_after", "attach_encodings", "fold_weight_transposes", "prune_initializers",
           "quantizer_tag"]

QUANTIZER_KEY = "hf_adaquant.quantizer"

_NUMPY_TYPES = {"INT2": ml_dtypes.int2, "UINT2": ml_dtypes.uint2, "INT4": ml_dtypes.int4, "UINT4": ml_dtypes.uint4,
                "INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "UINT16": np.uint16}


def quantizer_tag(layer: str, tensor: str) -> str:
    """Metadata value marking the nodes of ``layer``'s ``tensor`` quantizer ("weight", "input" or "output")."""
    return f"{layer}|{tensor}"


def _integers(values: np.ndarray, int_type: IntType, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values).astype(_NUMPY_TYPES[int_type.name]), name)


def _weight_initializers(prefix: str, enc: WeightEncoding) -> list[onnx.TensorProto]:
    return [_integers(enc.codes, enc.type, f"{prefix}.weight_quantized"),
            numpy_helper.from_array(enc.scale.astype(np.float32), f"{prefix}.weight_scale"),
            _integers(enc.zero_point, enc.type, f"{prefix}.weight_zero_point")]


def _activation_initializers(prefix: str, enc: ActivationEncoding, tensor: str) -> list[onnx.TensorProto]:
    # scalars: per-tensor QuantizeLinear/DequantizeLinear of the layer's input or output
    return [numpy_helper.from_array(np.array(enc.scale, dtype=np.float32), f"{prefix}.{tensor}_scale"),
            _integers(np.array(enc.zero_point), enc.type, f"{prefix}.{tensor}_zero_point")]


def _tag(node: onnx.NodeProto) -> str | None:
    for prop in node.metadata_props:
        if prop.key == QUANTIZER_KEY:
            return prop.value
    return None


def _drop_tag(node: onnx.NodeProto) -> None:
    kept = [p for p in node.metadata_props if p.key != QUANTIZER_KEY]
    del node.metadata_props[:]
    node.metadata_props.extend(kept)


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every value name read by a node of ``graph`` or of its subgraphs (If/Loop bodies), or output by it."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                names |= _read_names(attr.g)
            for sub in attr.graphs:
                names |= _read_names(sub)
    return names


def prune_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node reads any more (the placeholders and the float weights they stood for)."""
    used = _read_names(graph)
    kept = [t for t in graph.initializer if t.name in used]
    removed = {t.name for t in graph.initializer} - {t.name for t in kept}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    kept_info = [v for v in graph.value_info if v.name not in removed]
    del graph.value_info[:]
    graph.value_info.extend(kept_info)


def _consumers(graph: onnx.GraphProto, value: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if value in n.input]


def _transpose_codes(graph: onnx.GraphProto, dequantize: onnx.NodeProto,
                     inits: dict[str, onnx.TensorProto]) -> None:
    """Store a 2-d weight's codes transposed, ``[in, out]``, dequantized along ``axis=1``."""
    codes = inits[dequantize.input[0]]
    codes.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(codes).T), codes.name))
    for attr in dequantize.attribute:
        if attr.name == "axis":
            attr.i = 1
    _drop_value_info(graph, dequantize.output[0])


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    for info in [v for v in graph.value_info if v.name == name]:
        graph.value_info.remove(info)


def _linear_weight(graph: onnx.GraphProto, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]
                   ) -> onnx.NodeProto | None:
    """The weight ``DequantizeLinear`` of a 2-d weight read only by ``node`` (whose codes nothing else reads)."""
    if node.op_type != "DequantizeLinear" or not node.name.endswith(".weight_dequantize"):
        return None
    codes = inits.get(node.input[0])
    if codes is None or len(codes.dims) != 2 or len(_consumers(graph, codes.name)) != 1:
        return None  # a layer called twice shares its codes
    if any(o.name == node.output[0] for o in graph.output):
        return None
    return node


def fold_weight_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store each Linear weight that only feeds a ``Transpose(perm=[1, 0])`` (``x @ W.T`` for 3-d inputs)
    transposed, dequantized along ``axis=1``: ``DequantizeLinear -> MatMul`` is the pattern onnxruntime fuses into
    its integer kernels, and no transpose runs at inference. In place; returns ``model``."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    removed = []
    for node in graph.node:
        if _linear_weight(graph, node, inits) is None:
            continue
        users = _consumers(graph, node.output[0])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        transpose = users[0]
        if [list(a.ints) for a in transpose.attribute if a.name == "perm"] not in ([[1, 0]], []):
            continue
        _transpose_codes(graph, node, inits)
        node.output[0] = transpose.output[0]  # the transpose's readers now read the DequantizeLinear
        removed.append(transpose)
    for node in removed:
        graph.node.remove(node)
    return model


def add_biases_after(model: onnx.ModelProto, layers: set[str]) -> onnx.ModelProto:
    """Add the float bias of ``layers``' Conv/Gemm in an ``Add`` after it, in place; returns ``model``.

    onnxruntime's graph optimiser rounds the bias of a ``DequantizeLinear -> Conv/Gemm`` to an int32 multiple of
    input step x weight step, the form its integer kernels take. It has such kernels for 8-bit weights only; for
    other widths the rounding is pure error (up to half an output step at W4A4), so those biases are added in
    float, as PyTorch adds them. Their Gemm becomes ``MatMul`` on transposed codes: onnxruntime (1.32) fuses a
    bias-less ``Gemm`` after 2-bit codes into a ``QGemm`` it cannot run.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in inits:
            continue
        weight = producers.get(node.input[1])
        if weight is None or weight.name.removesuffix(".weight_dequantize") not in layers:
            continue
        if node.op_type == "Gemm":
            attrs = {"transA": 0, "transB": 0, "alpha": 1.0, "beta": 1.0, **attributes(node)}
            if attrs != {"transA": 0, "transB": 1, "alpha": 1.0, "beta": 1.0} or \
                    _linear_weight(graph, weight, inits) is None:
                continue
            _transpose_codes(graph, weight, inits)
            node.op_type = "MatMul"
            del node.attribute[:]
        bias = numpy_helper.to_array(inits[node.input[2]])
        rank = len(inits[weight.input[0]].dims) if node.op_type == "Conv" else 2
        name = f"{node.input[2]}.broadcast"
        graph.initializer.append(numpy_helper.from_array(bias.reshape((-1,) + (1,) * (rank - 2)), name))
        output = node.output[0]
        node.output[0] = f"{output}.without_bias"
        del node.input[2]
        graph.node.insert(index + 1, onnx.helper.make_node("Add", [node.output[0], name], [output],
                                                           name=f"{node.name or output}.bias_add"))
    return model


def _same_values(a: object, b: object) -> bool:
    """Dataclass encodings field by field (numpy arrays compared by value)."""
    fields = vars(a)
    return type(a) is type(b) and all(np.array_equal(np.asarray(v), np.asarray(vars(b)[k])) if isinstance(
        v, np.ndarray) or isinstance(vars(b)[k], np.ndarray) else v == vars(b)[k] for k, v in fields.items())


def _merged(tag: str, found: set[str], tables: dict[str, dict[str, Any]]) -> bool:
    """Whether the exporter merged ``tag``'s node into a found one with the same values (e.g. query, key and value
    layers quantizing the same hidden states with the same grid: one QuantizeLinear serves all three)."""
    layer, tensor = tag.rsplit("|", 1)
    table = tables[tensor]
    return any(_same_values(table[layer], table[other.rsplit("|", 1)[0]])
               for other in found if other.endswith(f"|{tensor}"))


def attach_encodings(model: onnx.ModelProto, weights: dict[str, WeightEncoding],
                     inputs: dict[str, ActivationEncoding], traced: set[str],
                     outputs: dict[str, ActivationEncoding] | None = None) -> onnx.ModelProto:
    """Give the tagged quantizer nodes of ``model`` their integer initializers, in place; returns ``model``.

    Args:
        weights / inputs / outputs: the encodings by layer name (outputs: layers with an output quantizer).
        traced: tags the export traced; each must be found in the graph.

    Raises:
        ExportError: a traced quantizer is missing from the graph (the exporter rewrote it).
    """
    graph = model.graph
    tables: dict[str, dict[str, Any]] = {"weight": weights, "input": inputs, "output": outputs or {}}
    found: set[str] = set()
    new: dict[str, onnx.TensorProto] = {}
    for node in graph.node:
        tag = _tag(node)
        if tag is None:
            continue
        layer, tensor = tag.rsplit("|", 1)
        prefix = layer or "model"
        if tensor == "weight":
            tensors = _weight_initializers(prefix, weights[layer])
            node.input[:] = [t.name for t in tensors]
            node.name = f"{prefix}.weight_dequantize"
        else:
            tensors = _activation_initializers(prefix, tables[tensor][layer], tensor)
            node.input[1:] = [t.name for t in tensors]
            node.name = f"{prefix}.{tensor}_{'quantize' if node.op_type == 'QuantizeLinear' else 'dequantize'}"
        new.update({t.name: t for t in tensors})
        _drop_tag(node)
        found.add(tag)
    missing = sorted(tag for tag in traced - found if not _merged(tag, found, tables))
    if missing:
        raise ExportError(f"the exported graph lost the quantizers {missing[:5]} (torch.onnx rewrote them)")
    graph.initializer.extend(new.values())
    return model
