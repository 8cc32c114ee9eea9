"""Reading a QDQ graph for the fused rewrite: an index of its initializers, producers and readers, constant values,
and the requantization pattern onnxruntime fuses into ``QLinearConv`` (``Conv [-> Relu/Clip/MaxPool] ->
QuantizeLinear``)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["GraphIndex", "attributes", "leads_to_quantize"]


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes by name, as Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class GraphIndex:
    """Small helpers over a graph being rewritten (initializers by name, producers, consumers)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.producers = {o: n for n in self.graph.node for o in n.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {o.name for o in self.graph.output}

    def add(self, array: np.ndarray, name: str) -> str:
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])


def _constant(g: GraphIndex, name: str) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a ``Constant`` node's output, else None."""
    if name in g.inits:
        return g.array(name)
    node = g.producers.get(name)
    if node is not None and node.op_type == "Constant":
        value = attributes(node).get("value")
        return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else None
    return None


def _quantize_domain(g: GraphIndex, q: onnx.NodeProto) -> tuple[float, float] | None:
    """The float range a per-tensor ``QuantizeLinear`` can represent: ``((qmin - zp) * s, (qmax - zp) * s)``."""
    scale = _constant(g, q.input[1])
    zp = _constant(g, q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    info = np.iinfo(zp.dtype)
    return (float(info.min) - float(zp)) * float(scale), (float(info.max) - float(zp)) * float(scale)


def _removable_before(g: GraphIndex, node: onnx.NodeProto, q: onnx.NodeProto) -> bool:
    """Whether the Relu/Clip ``node`` changes nothing once ``q`` saturates to its type: its bounds hold the whole
    range ``q`` represents. onnxruntime then drops it and fuses the convolution with the requantization; the
    exporter's clip to a grid narrower than its 8-bit container (A <= 7) is narrower and stays."""
    domain = _quantize_domain(g, q)
    if domain is None:
        return False
    if node.op_type == "Relu":
        return domain[0] >= 0.0
    low = _constant(g, node.input[1]) if len(node.input) > 1 and node.input[1] else np.array(-np.inf)
    high = _constant(g, node.input[2]) if len(node.input) > 2 and node.input[2] else np.array(np.inf)
    if low is None or high is None:
        return False
    # one step of float slack: onnxruntime compares in float, and the grid's ends are computed ones
    return float(low) <= domain[0] + 1e-6 and float(high) >= domain[1] - 1e-6


def leads_to_quantize(g: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether ``node``'s output reaches a ``QuantizeLinear`` through Relu/Clip/MaxPool nodes only, without
    branching: the pattern onnxruntime fuses into QLinearConv (requantizing the output to the next layer's input
    grid). A Relu/Clip right before the QuantizeLinear must leave its domain whole (a ReLU6 before an input grid
    within [0, 6], a ReLU before a grid starting at 0)."""
    current = node
    while True:
        if len(current.output) != 1 or current.output[0] in g.outputs:
            return False
        readers = g.readers.get(current.output[0], [])
        if len(readers) != 1:
            return False
        if readers[0].op_type == "QuantizeLinear":
            return current.op_type not in ("Relu", "Clip") or _removable_before(g, current, readers[0])
        if len(readers[0].output) != 1:
            return False
        # Relu/Clip: folded into the requantization; MaxPool: onnxruntime moves the QuantizeLinear above it
        if readers[0].op_type not in ("Relu", "Clip", "MaxPool"):
            return False
        current = readers[0]
