"""The ``"fused"`` op style: the QDQ graph arranged so that onnxruntime runs it on its fast integer kernels.

In the plain QDQ form (``QuantizeLinear -> DequantizeLinear -> Conv <- DequantizeLinear(weight codes)``) onnxruntime
(1.32, CPU) fuses a convolution into ``QLinearConv`` only when its output is requantized (``Conv [-> Relu/Clip] ->
QuantizeLinear``), and its fast kernels (VNNI/AMX) take uint8 activations with *int8* weights: with uint8 weights it
picks a kernel about as slow as float. Every other convolution dequantizes its weights on every run
(``DequantizeLinear`` on an initializer is kept out of constant folding) and runs in float: the model ran slower than
the float one. :func:`fused_qdq` therefore rewrites, per quantized layer:

- a Conv whose output is requantized, and every MatMul/Gemm: the weight ``DequantizeLinear`` reads int8 codes
  computed from the stored ones (``codes - zero-point`` with zero-point 0, or for MatMul/Gemm ``codes - 128`` with
  per-column zero-points) by ``Cast -> Sub -> Cast`` nodes on initializers, which onnxruntime folds at load; the
  file keeps the stored codes (4-bit stays 4-bit). onnxruntime then fuses QLinearConv / MatMulIntegerToFloat.
- a Conv whose output stays float (e.g. before a residual Add), or with 8-bit per-channel asymmetric weights (their
  ``codes - zero-point`` do not fit int8 and QLinearConv takes one weight zero-point): the weight is dequantized by
  foldable ``Cast -> Sub -> Mul`` nodes (the same float operations as ``DequantizeLinear``) and the convolution runs
  in float at the float model's speed. A model quantized with ``residual_output_bits=8`` has an output quantizer
  on the convolutions before residual Adds (exported as ``QuantizeLinear`` right after the Conv): they take the
  first form.

The dequantized values are unchanged, so the numbers are the QDQ form's (see :mod:`.onnx` on onnxruntime's integer
kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .encodings import ActivationEncoding, WeightEncoding
from .graph_index import GraphIndex, attributes, leads_to_quantize

__all__ = ["ASYMMETRIC_8BIT", "Rewrite", "fused_qdq"]

# why a convolution whose output is requantized still runs in float: the one reason the user can remove, by
# quantizing with weight_symmetric=True
ASYMMETRIC_8BIT = "8-bit weights with per-channel zero-points (QLinearConv takes one)"


@dataclass
class Rewrite:
    """What :func:`fused_qdq` did, by layer name: ``"fused"`` (int8 weight codes, for onnxruntime's integer
    kernels), ``"float"`` (foldable dequantization, float op) or ``"qdq"`` (left as it was), with the reason for the
    last two."""

    forms: dict[str, str]
    reasons: dict[str, str]


def _broadcast(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


def _activation(g: GraphIndex, op: onnx.NodeProto, inputs: dict[str, ActivationEncoding], layer: str
                ) -> tuple[onnx.NodeProto, str] | str:
    """The activation ``DequantizeLinear`` feeding ``op`` and the codes it reads, or why the layer cannot run on
    onnxruntime's fast integer kernels."""
    dq = g.producers.get(op.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return "its input is not quantized"
    q = g.producers.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return "its input codes do not come from a QuantizeLinear"
    enc = inputs.get(layer)
    if enc is None:
        return "float inputs"
    zp = g.inits.get(dq.input[2])
    if zp is None or zp.data_type != TensorProto.UINT8:
        # onnxruntime's fast QLinearConv kernels take uint8 activations
        return f"{'signed' if zp is not None and zp.data_type == TensorProto.INT8 else 'non-uint8'} input codes"
    return dq, dq.input[0]


def _signed_weight(g: GraphIndex, prefix: str, dq: onnx.NodeProto, enc: WeightEncoding, axis: int,
                   per_channel_zero_point: bool) -> list[onnx.NodeProto] | None:
    """Rewire the weight ``DequantizeLinear`` ``dq`` onto int8 codes computed from the stored ones by
    ``Cast -> Sub -> Cast`` on initializers (folded by onnxruntime at load): ``codes - zp`` with zero-point 0 when
    that fits int8 (any grid of 7 bits or fewer, symmetric 8-bit grids), else (``per_channel_zero_point``, 8-bit
    grids) ``codes - 128`` with zero-points ``zp - 128``. The dequantized values are unchanged. onnxruntime's
    fast integer kernels take uint8 activations with int8 weights (uint8 weights run on a kernel about as slow as
    float). Returns the new nodes (ending with ``dq``), or None when neither form fits."""
    codes = g.array(dq.input[0]).astype(np.int64)
    rank = codes.ndim
    zp = enc.zero_point.astype(np.int64)
    centred = codes - _broadcast(zp, axis, rank)
    if centred.min() >= -128 and centred.max() <= 127:
        shift, new_zp = zp, np.zeros_like(zp)
    elif per_channel_zero_point and codes.min() >= 0 and codes.max() <= 255 and zp.min() >= 0 and zp.max() <= 255:
        shift, new_zp = np.full_like(zp, 128), zp - 128
    else:
        return None
    nodes: list[onnx.NodeProto] = []
    if enc.type.name == "INT8" and not shift.any():
        codes_name = dq.input[0]
    else:
        wide, shifted, codes_name = (f"{prefix}.weight_int32", f"{prefix}.weight_shifted",
                                     f"{prefix}.weight_int8")
        shift_name = g.add(_broadcast(shift, axis, rank).astype(np.int32), f"{prefix}.weight_shift")
        nodes += [helper.make_node("Cast", [dq.input[0]], [wide], to=TensorProto.INT32,
                                   name=f"{prefix}.weight_cast_int32"),
                  helper.make_node("Sub", [wide, shift_name], [shifted], name=f"{prefix}.weight_shift_sub"),
                  helper.make_node("Cast", [shifted], [codes_name], to=TensorProto.INT8,
                                   name=f"{prefix}.weight_cast_int8")]
    zp_name = g.add(new_zp.astype(np.int8).reshape(g.inits[dq.input[2]].dims), f"{prefix}.weight_zero_point_int8")
    dq.input[0], dq.input[2] = codes_name, zp_name
    return [*nodes, dq]


def _float_weight(g: GraphIndex, prefix: str, dq: onnx.NodeProto, enc: WeightEncoding, out_axis: int
                  ) -> list[onnx.NodeProto]:
    """``DequantizeLinear`` of the weight as ``Cast -> Sub -> Mul`` on initializers (the same float operations:
    ``(q - zp) * step``), which onnxruntime folds into a float weight at load; writes ``dq``'s output."""
    rank = len(g.inits[dq.input[0]].dims)
    zp = g.add(_broadcast(enc.zero_point.astype(np.float32), out_axis, rank), f"{prefix}.weight_zero_point_float")
    step = g.add(_broadcast(enc.scale.astype(np.float32), out_axis, rank), f"{prefix}.weight_scale_broadcast")
    codes = f"{prefix}.weight_codes_float"
    centred = f"{prefix}.weight_centred"
    return [helper.make_node("Cast", [dq.input[0]], [codes], to=TensorProto.FLOAT, name=f"{prefix}.weight_cast"),
            helper.make_node("Sub", [codes, zp], [centred], name=f"{prefix}.weight_sub_zero_point"),
            helper.make_node("Mul", [centred, step], [dq.output[0]], name=f"{prefix}.weight_mul_step")]


def _per_channel_input(g: GraphIndex, prefix: str, dq: onnx.NodeProto, op: onnx.NodeProto) -> onnx.NodeProto:
    """The input ``DequantizeLinear`` of a float-weight Conv again, with its step and zero-point repeated per
    channel (the same numbers): onnxruntime's WeightBiasQuantization re-quantizes the float weight (per tensor,
    int8: other numbers) of a Conv whose input comes from a per-tensor DequantizeLinear and whose output is
    quantized; a per-channel one keeps it out. Rewires ``op``'s input."""
    attrs = attributes(op)
    weight_dims = g.inits[_weight_codes(g, op)].dims
    channels = int(weight_dims[1]) * int(attrs.get("group", 1))
    scale = np.full(channels, g.array(dq.input[1]), dtype=np.float32)
    zp = g.array(dq.input[2])
    scale_name = g.add(scale, f"{prefix}.input_scale_per_channel")
    zp_name = g.add(np.full(channels, zp, dtype=zp.dtype), f"{prefix}.input_zero_point_per_channel")
    output = f"{prefix}.input_dequantized"
    op.input[0] = output
    return helper.make_node("DequantizeLinear", [dq.input[0], scale_name, zp_name], [output], axis=1,
                            name=f"{prefix}.input_dequantize_per_channel")


def _weight_codes(g: GraphIndex, op: onnx.NodeProto) -> str:
    """The codes initializer behind ``op``'s weight (read through its DequantizeLinear)."""
    return g.producers[op.input[1]].input[0]


def fused_qdq(model: onnx.ModelProto, weights: dict[str, WeightEncoding],
              inputs: dict[str, ActivationEncoding]) -> Rewrite:
    """Arrange the QDQ graph for onnxruntime's fused integer kernels, in place (see :func:`export_onnx`'s
    ``op_style="fused"``). Returns what each layer became: ``"fused"`` (QDQ that onnxruntime fuses), ``"float"``
    (foldable dequantization, float op) or ``"qdq"`` (unchanged)."""
    g = GraphIndex(model)
    forms: dict[str, str] = {}
    reasons: dict[str, str] = {}
    prefixes = {(name or "model"): name for name in weights}
    replaced: dict[int, list[onnx.NodeProto]] = {}
    for dq_w in list(g.graph.node):
        if dq_w.op_type != "DequantizeLinear" or not dq_w.name.endswith(".weight_dequantize"):
            continue
        prefix = dq_w.name.removesuffix(".weight_dequantize")
        layer = prefixes.get(prefix)
        if layer is None:
            continue
        enc = weights[layer]
        users = g.readers.get(dq_w.output[0], [])
        if len(users) != 1 or users[0].op_type not in ("Conv", "MatMul", "Gemm") or len(
                g.readers.get(dq_w.input[0], [])) != 1:
            forms[layer], reasons[layer] = "qdq", "its weight is read by more than one op"
            continue
        op = users[0]
        axis = ([a.i for a in dq_w.attribute if a.name == "axis"] or [1])[0]
        if op.op_type != "Conv":  # MatMul/Gemm: onnxruntime fuses MatMulIntegerToFloat / QGemm
            input_dq = g.producers.get(op.input[0])
            if input_dq is None or input_dq.op_type != "DequantizeLinear":
                forms[layer], reasons[layer] = "qdq", "float inputs"
                continue
            nodes = _signed_weight(g, prefix, dq_w, enc, axis, per_channel_zero_point=True)
            if nodes is None:
                forms[layer], reasons[layer] = "qdq", "weight zero-points beyond 8 bits"
                continue
            replaced[id(dq_w)] = nodes
            forms[layer] = "fused"
            continue
        found = _activation(g, op, inputs, layer)
        # 8-bit input grids only: the integer kernel rounds the bias to input step x weight step, an error that
        # grows with the step (at A4 it reaches a good fraction of an output step)
        requantized = leads_to_quantize(g, op) and layer in inputs and inputs[layer].bits == 8
        nodes = None
        if not isinstance(found, str) and requantized:
            nodes = _signed_weight(g, prefix, dq_w, enc, axis, per_channel_zero_point=False)
        if nodes is None:
            # float convolution on foldable float weights (onnxruntime would otherwise dequantize the weight on
            # every run)
            replaced[id(dq_w)] = _float_weight(g, prefix, dq_w, enc, 0)
            input_dq = g.producers.get(op.input[0])
            if input_dq is not None and input_dq.op_type == "DequantizeLinear":
                replaced[id(op)] = [_per_channel_input(g, prefix, input_dq, op), op]
            forms[layer] = "float"
            reasons[layer] = (found if isinstance(found, str) else "its output stays float" if not requantized
                              else ASYMMETRIC_8BIT)
            continue
        replaced[id(dq_w)] = nodes
        forms[layer] = "fused"
    new_nodes: list[onnx.NodeProto] = []
    for node in g.graph.node:
        new_nodes.extend(replaced.get(id(node), [node]))
    del g.graph.node[:]
    g.graph.node.extend(new_nodes)
    _drop_unread(g.graph)
    return Rewrite(forms, reasons)


def _drop_unread(graph: onnx.GraphProto) -> None:
    """Remove ``DequantizeLinear`` nodes whose output nothing reads any more (activation DQs now skipped), and
    the value infos of removed values."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "DequantizeLinear" and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    kept = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(kept)
