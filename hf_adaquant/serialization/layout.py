"""The checkpoint layout: which layers are quantized how, and the layer <-> packed-tensor conversions.

A quantized layer ``L`` is stored under names a float loader does not know (``L.weight_packed``, ``L.weight_scale``,
``L.weight_zero_point``, ``L.weight_signed``, ``L.input_scale``, ``L.input_zero_point``, ``L.input_signed``; a layer
with an output quantizer also ``L.output_scale``, ``L.output_zero_point``, ``L.output_signed``) plus its float
``L.bias``; its float ``L.weight`` is never written. On load the float weight is rebuilt from the codes as
``(code - zero_point) * step``, a point of the grid, so fake-quantizing it again gives exactly the stored codes.
Quantized embedding tables are described under ``embeddings`` (see :mod:`.embeddings`); a layout that has them is
version 2, so that a library reading only version 1 refuses it with a clear message; one with output quantizers
(``residual_output_bits``) is version 3, for the same reason (an older library would drop them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn import QMODULES, QModuleMixin
from ..nn.qmodule import OUTPUT_ACTIVATIONS
from ..prepare.fold_bn import folded_replacement
from ..quant.functional import qrange
from ..quant.quantizer import MIN_STEP
from ..utils.modules import set_submodule
from .embeddings import describe_embeddings, quantize_embedding_skeleton_
from .pack import check_tensor_specs, pack_codes, packed_nbytes, unpack_codes

__all__ = ["LAYOUT_VERSION", "READABLE_LAYOUT_VERSIONS", "WEIGHTS_NAME", "check_layer_tensors", "describe_model", "layer_tensor_specs",
           "pack_layer", "quantize_skeleton_", "unpack_layer", "validate_layer_description"]

# Written: 3 when a layer has an output quantizer, else 2 when the model has quantized embeddings, else 1 (the
# lowest version that holds the model, so older readers load what they can read and refuse what they cannot).
LAYOUT_VERSION = 3
EMBEDDINGS_LAYOUT_VERSION = 2
READABLE_LAYOUT_VERSIONS = (1, 2, 3)
# Not ``model.safetensors``: loaders that do not know the format (transformers or timm without hf_adaquant) then
# find no weights they recognise and fail instead of building a float model around missing weights.
WEIGHTS_NAME = "adaquant_model.safetensors"
_MIN_BITS, _MAX_BITS = 2, 8
_LAYER_KEYS = ("type", "weight_bits", "activation_bits", "weight_symmetric", "activation_symmetric",
               "output_activation", "weight_shape")
# present only for a layer with an output quantizer (so that the layout of other models stays as it was)
_OUTPUT_KEYS = ("output_bits", "output_symmetric")


def describe_layer(module: QModuleMixin) -> dict[str, Any]:
    """JSON description of one quantized layer (what rebuilding its module needs)."""
    iq = module.input_quantizer
    return {
        # the registered quantized class (a frozen FrozenQConv2d is stored as the QConv2d it packs)
        "type": next((c for c in type(module).__mro__ if c in QMODULES.values()), type(module)).__name__,
        "weight_bits": module.weight_quantizer.bits,
        "activation_bits": None if iq is None else iq.bits,
        "weight_symmetric": bool(module.weight_quantizer.symmetric),
        "activation_symmetric": bool(iq.symmetric) if iq is not None else False,
        "output_activation": module.output_activation,
        "weight_shape": list(module.weight.shape),
    } | _describe_output(module)


def _describe_output(module: QModuleMixin) -> dict[str, Any]:
    oq = module.output_quantizer
    return {} if oq is None else {"output_bits": oq.bits, "output_symmetric": bool(oq.symmetric)}


def describe_model(qmodel: nn.Module, folded_batchnorms: dict[str, str]) -> dict[str, Any]:
    """The ``checkpoint_layout`` stored in ``quantization_config``: version, weights file, layers, folded BNs."""
    layers = {name: describe_layer(m) for name, m in qmodel.named_modules() if isinstance(m, QModuleMixin)}
    if not layers:
        raise ValueError("the model has no quantized layer: pass the model returned by hf_adaquant.quantize")
    layout = {"version": 1, "weights_file": WEIGHTS_NAME,
              "packing": "unsigned codes (code - qmin), 8-bit slots for 5..8 bits, 4-bit for 3..4, 2-bit for 2",
              "layers": layers, "folded_batchnorms": dict(folded_batchnorms)}
    embeddings = describe_embeddings(qmodel)
    if embeddings:
        layout.update(version=EMBEDDINGS_LAYOUT_VERSION, embeddings=embeddings)
    if any("output_bits" in desc for desc in layers.values()):
        layout["version"] = LAYOUT_VERSION
    return layout


def _check_bits(value: Any, key: str, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not _MIN_BITS <= value <= _MAX_BITS:
        raise ValueError(f"{key} must be an integer in {_MIN_BITS}..{_MAX_BITS}"
                         f"{' or null' if allow_none else ''}, got {value!r}")


def validate_layer_description(desc: Any) -> None:
    """Check one ``checkpoint_layout.layers`` entry (types and ranges of every field).

    Raises:
        ValueError: a field is missing or has an impossible value (names the field).
    """
    if not isinstance(desc, dict):
        raise ValueError(f"must be a JSON object, got {type(desc).__name__}")
    missing = [key for key in _LAYER_KEYS if key not in desc]
    if missing:
        raise ValueError(f"lacks {missing}")
    if not isinstance(desc["type"], str):
        raise ValueError(f"type must be a class name, got {desc['type']!r}")
    _check_bits(desc["weight_bits"], "weight_bits", allow_none=False)
    _check_bits(desc["activation_bits"], "activation_bits", allow_none=True)
    for key in ("weight_symmetric", "activation_symmetric"):
        if not isinstance(desc[key], bool):
            raise ValueError(f"{key} must be true or false, got {desc[key]!r}")
    if desc["output_activation"] is not None and desc["output_activation"] not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output_activation must be one of {sorted(OUTPUT_ACTIVATIONS)} or null, "
                         f"got {desc['output_activation']!r}")
    present = [key for key in _OUTPUT_KEYS if key in desc]
    if present and len(present) != len(_OUTPUT_KEYS):
        raise ValueError(f"has {present} without {sorted(set(_OUTPUT_KEYS) - set(present))}")
    if present:
        _check_bits(desc["output_bits"], "output_bits", allow_none=False)
        if not isinstance(desc["output_symmetric"], bool):
            raise ValueError(f"output_symmetric must be true or false, got {desc['output_symmetric']!r}")
    shape = desc["weight_shape"]
    if not isinstance(shape, list) or not shape or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError(f"weight_shape must be a list of positive integers, got {shape!r}")


def layer_tensor_specs(desc: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{suffix: (dtype, shape)}`` of the tensors stored for a layer described by ``desc``."""
    shape = tuple(desc["weight_shape"])
    channels = shape[0]
    specs = {
        "weight_packed": (torch.uint8, (packed_nbytes(math.prod(shape), desc["weight_bits"]),)),
        "weight_scale": (torch.float32, (channels,)),
        "weight_zero_point": (torch.int32, (channels,)),
        "weight_signed": (torch.uint8, (1,)),
        "bias": (torch.float32, (channels,)),
    }
    for side, _, _ in _activation_sides(desc):
        specs.update({f"{side}_scale": (torch.float32, (1,)), f"{side}_zero_point": (torch.int32, (1,)),
                      f"{side}_signed": (torch.uint8, (1,))})
    return specs


def _activation_sides(desc: dict[str, Any]) -> list[tuple[str, int, bool]]:
    """``(side, bits, symmetric)`` of the layer's per-tensor activation quantizers: input, output."""
    sides = []
    if desc["activation_bits"] is not None:
        sides.append(("input", desc["activation_bits"], desc["activation_symmetric"]))
    if desc.get("output_bits") is not None:
        sides.append(("output", desc["output_bits"], desc["output_symmetric"]))
    return sides


@torch.no_grad()
def pack_layer(module: QModuleMixin) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` holding ``module``'s packed weight codes and quantizer parameters (CPU)."""
    wq = module.weight_quantizer
    if not bool(wq.initialized):
        raise ValueError(f"{type(module).__name__} has an uncalibrated weight quantizer; nothing to save")
    codes = wq.int_codes(module.weight) - wq.qmin
    out = {
        "weight_packed": pack_codes(codes, wq.bits),
        "weight_scale": wq.scale.detach().float().cpu().clone(),
        "weight_zero_point": torch.round(wq.zero_point.detach()).to(torch.int32).cpu(),
        "weight_signed": torch.tensor([int(wq.signed)], dtype=torch.uint8),
        "bias": module.bias.detach().float().cpu().clone(),
    }
    for side, q in module.activation_quantizers().items():
        if not bool(q.initialized):
            raise ValueError(f"{type(module).__name__} has an uncalibrated {side} quantizer; nothing to save")
        out.update({f"{side}_scale": q.scale.detach().float().cpu().clone(),
                    f"{side}_zero_point": torch.round(q.zero_point.detach()).to(torch.int32).cpu(),
                    f"{side}_signed": torch.tensor([int(q.signed)], dtype=torch.uint8)})
    # what load would refuse is refused here, so a save that succeeds always loads
    check_layer_tensors(out, describe_layer(module))
    return out


def _check_zero_points(zero_point: torch.Tensor, bits: int, symmetric: bool, signed: bool, what: str) -> None:
    if symmetric:
        if bool((zero_point != 0).any()):
            raise ValueError(f"{what} zero-point must be 0 on a symmetric grid, got {int(zero_point.abs().max())}")
        return
    qmin, qmax = qrange(bits, signed)
    # AdaQuant learns zero-points, so one may leave the grid a little, never by a whole grid width: farther out it
    # belongs to a quantizer of other bits (e.g. an 8-bit zero-point 122 under a config edited to 2 bits).
    slack = 2**bits
    outside = (zero_point < qmin - slack) | (zero_point > qmax + slack)
    if bool(outside.any()):
        raise ValueError(f"{what} zero-point {int(zero_point[outside][0])} is far outside the {bits}-bit grid "
                         f"[{qmin}, {qmax}]: it does not belong to a {bits}-bit quantizer")


def check_layer_tensors(tensors: dict[str, torch.Tensor], desc: dict[str, Any]) -> None:
    """Check a layer's stored tensors against its description: names, dtypes and shapes, ``signed`` flags 0/1,
    zero-points that fit the described bits (defence in depth: the checkpoint digests catch edits first).

    Raises:
        ValueError: the first inconsistency, naming the tensor.
    """
    check_tensor_specs(tensors, layer_tensor_specs(desc))
    sides = [("weight", desc["weight_bits"], desc["weight_symmetric"]), *_activation_sides(desc)]
    for side, bits, symmetric in sides:
        flag = int(tensors[f"{side}_signed"].item())
        if flag not in (0, 1):
            raise ValueError(f"tensor '{side}_signed' must be 0 or 1, got {flag}")
        _check_zero_points(tensors[f"{side}_zero_point"].cpu(), bits, symmetric, bool(flag), side)


def unpack_layer(tensors: dict[str, torch.Tensor], desc: dict[str, Any],
                 where: str = "layer") -> tuple[dict[str, torch.Tensor], dict[str, bool]]:
    """The quantized module's state dict (relative names) and its ``signed`` flags from the stored tensors.

    Raises:
        ValueError: a tensor is missing, has the wrong dtype/shape, or values that do not fit the layer's bits
            (``where`` names the layer and file).
    """
    try:
        check_layer_tensors(tensors, desc)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc
    bits, shape = desc["weight_bits"], tuple(desc["weight_shape"])
    signed = {"weight": bool(tensors["weight_signed"].item())}
    qmin, qmax = qrange(bits, signed["weight"])
    codes = unpack_codes(tensors["weight_packed"].cpu(), bits, math.prod(shape)).reshape(shape) + qmin
    if int(codes.max()) > qmax:
        raise ValueError(f"{where}: weight codes exceed the {bits}-bit grid")
    bshape = (-1,) + (1,) * (len(shape) - 1)
    scale = tensors["weight_scale"].float().cpu()
    zero_point = tensors["weight_zero_point"].float().cpu()
    weight = (codes.float() - zero_point.reshape(bshape)) * scale.clamp(min=MIN_STEP).reshape(bshape)
    state = {"weight": weight, "bias": tensors["bias"].float().cpu(), "weight_quantizer.scale": scale,
             "weight_quantizer.zero_point": zero_point, "weight_quantizer.initialized": torch.tensor(True)}
    for side, _, _ in _activation_sides(desc):
        signed[side] = bool(tensors[f"{side}_signed"].item())
        state.update({f"{side}_quantizer.scale": tensors[f"{side}_scale"].float().cpu(),
                      f"{side}_quantizer.zero_point": tensors[f"{side}_zero_point"].float().cpu(),
                      f"{side}_quantizer.initialized": torch.tensor(True)})
    return state, signed


def build_qmodule(float_module: nn.Module, desc: dict[str, Any], where: str = "layer") -> QModuleMixin:
    """The quantized twin of ``float_module`` as ``desc`` describes it (weights still to be loaded)."""
    qcls = QMODULES.get(type(float_module))
    if qcls is None or qcls.__name__ != desc["type"]:
        raise ValueError(f"{where}: checkpoint has a {desc['type']} where the model has a "
                         f"{type(float_module).__name__} (quantized as {getattr(qcls, '__name__', None)})")
    q = qcls.from_float(float_module, desc["weight_bits"], desc["activation_bits"],
                        weight_symmetric=desc["weight_symmetric"], activation_symmetric=desc["activation_symmetric"])
    if list(q.weight.shape) != list(desc["weight_shape"]):
        raise ValueError(f"{where}: weight shape {list(q.weight.shape)} in the model, {desc['weight_shape']} in the "
                         "checkpoint (wrong architecture or model arguments?)")
    q.output_activation = desc["output_activation"]
    if desc.get("output_bits") is not None:
        q.add_output_quantizer(desc["output_bits"], symmetric=desc["output_symmetric"])
    return q


def apply_signed(module: QModuleMixin, signed: dict[str, bool]) -> None:
    module.weight_quantizer.signed = signed["weight"]
    for side, q in module.activation_quantizers().items():
        q.signed = signed[side]


def replace_folded_batchnorms_(model: nn.Module, folded: dict[str, str]) -> None:
    """Replace each BatchNorm that was folded at quantization time by what folding left in its place."""
    for bn_name in folded:
        try:
            bn = model.get_submodule(bn_name)
        except AttributeError as exc:
            raise ValueError(f"folded BatchNorm {bn_name!r} is not in the model (wrong architecture?)") from exc
        if not isinstance(bn, _BatchNorm):
            raise ValueError(f"{bn_name!r} should be a BatchNorm, the model has a {type(bn).__name__}")
        set_submodule(model, bn_name, folded_replacement(bn))


def quantize_skeleton_(model: nn.Module, layout: dict[str, Any], where: str = "checkpoint") -> nn.Module:
    """Turn a float skeleton into the quantized model's structure, in place (weights still to be loaded)."""
    replace_folded_batchnorms_(model, layout["folded_batchnorms"])
    for name, desc in layout["layers"].items():
        try:
            float_module = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{where}: quantized layer {name!r} is not in the model (wrong architecture?)") from exc
        set_submodule(model, name, build_qmodule(float_module, desc, f"{where}: layer {name!r}"))
    quantize_embedding_skeleton_(model, layout.get("embeddings", {}), where)
    return model
