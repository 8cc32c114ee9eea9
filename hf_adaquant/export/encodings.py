"""How each quantizer of a quantized model is stored in ONNX: integer types, zero-points, clip ranges, opsets.

A weight is stored as its integer codes in the narrowest ONNX type that holds its grid: 8-bit types for 5..8 bits,
4-bit types (``INT4``/``UINT4``, opset 21) for 3..4 bits, 2-bit types (``INT2``/``UINT2``, opset 25) for 2 bits,
or a 4-bit container where the opset asked for is below 25. An activation quantizer becomes
``QuantizeLinear``/``DequantizeLinear`` in an 8-bit container: ONNX ``QuantizeLinear`` saturates to the whole type
range, so a grid narrower than the container (A <= 7) gets an explicit ``Clip`` to the grid's float range first,
which gives exactly PyTorch's codes. 8-bit activations keep onnxruntime's integer kernels (QLinearConv,
QLinearMatMul) available to its graph optimiser.

A learned zero-point can leave its grid; such a tensor is widened to the next type that holds it (never silently
clipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..nn import QModuleMixin
from ..quant import Quantizer
from ..quant.functional import qrange

__all__ = ["EXPORTER_MIN_OPSET", "ActivationEncoding", "ExportError", "IntType", "OpsetTooLowError",
           "WeightEncoding", "activation_encoding", "output_encoding", "weight_encoding"]

# torch.onnx's exporter (dynamo=True) translates to opset 18 and up.
EXPORTER_MIN_OPSET = 18


class ExportError(ValueError):
    """The model, its inputs or the options cannot be exported (names the layer or argument at fault)."""


class OpsetTooLowError(ExportError):
    """The opset asked for has no integer type for some quantizer's grid."""

    def __init__(self, message: str, minimum: int) -> None:
        super().__init__(message)
        self.minimum = minimum


@dataclass(frozen=True)
class IntType:
    """An ONNX integer tensor type usable by ``QuantizeLinear``/``DequantizeLinear``."""

    name: str  # ONNX TensorProto name, e.g. "UINT4"
    width: int
    signed: bool
    min_opset: int  # first opset whose QuantizeLinear/DequantizeLinear accept the type

    @property
    def lo(self) -> int:
        return qrange(self.width, self.signed)[0]

    @property
    def hi(self) -> int:
        return qrange(self.width, self.signed)[1]

    def holds(self, lo: int, hi: int) -> bool:
        return self.lo <= lo and hi <= self.hi


# DequantizeLinear with per-axis scales: opset 13 for 8-bit, 21 for 4- and 16-bit, 25 for 2-bit types.
_TYPES = {(w, s): IntType(f"{'' if s else 'U'}INT{w}", w, s, {2: 25, 4: 21, 8: 13, 16: 21}[w])
          for w in (2, 4, 8, 16) for s in (True, False)}


def _types_of_width(width: int, signed: bool) -> list[IntType]:
    # An unsigned grid whose zero-point went negative still fits the signed type of the same width.
    return [_TYPES[width, signed], _TYPES[width, not signed]]


def _preferred_widths(bits: int) -> tuple[int, ...]:
    return (2, 4) if bits == 2 else (4,) if bits <= 4 else (8,)


def _fitting_types(bits: int, signed: bool, zero_points: np.ndarray, widths: tuple[int, ...],
                   widen_to: tuple[int, ...]) -> list[IntType]:
    """Types of the first of ``widths`` / ``widen_to`` that hold both the grid and every zero-point."""
    qmin, qmax = qrange(bits, signed)
    lo, hi = min(qmin, int(zero_points.min())), max(qmax, int(zero_points.max()))
    for group in (widths, widen_to):
        fitting = [t for w in group for t in _types_of_width(w, signed) if t.holds(lo, hi)]
        if fitting:
            return fitting
    return []


def _choose(fitting: list[IntType], opset: int | None, what: str) -> IntType:
    if not fitting:
        raise ExportError(f"{what}: its zero-point lies beyond every 16-bit integer type")
    if opset is None:
        return fitting[0]
    allowed = [t for t in fitting if t.min_opset <= opset]
    if not allowed:
        minimum = min(t.min_opset for t in fitting)
        raise OpsetTooLowError(f"{what}: needs opset >= {minimum} (ONNX type {fitting[0].name}), asked for {opset}",
                               minimum)
    return allowed[0]


def _step(q: Quantizer) -> np.ndarray:
    # the clamp Quantizer.step applies, in float32 as in PyTorch
    return q.scale.detach().float().clamp(min=1e-8).cpu().numpy().astype(np.float32)


def _zero_points(q: Quantizer) -> np.ndarray:
    return torch.round(q.zero_point.detach().float()).cpu().numpy().astype(np.int64)


@dataclass
class WeightEncoding:
    """A weight as integer codes (``int64`` array, the layer's weight shape) on a per-output-channel grid."""

    codes: np.ndarray
    scale: np.ndarray  # (out_channels,) float32
    zero_point: np.ndarray  # (out_channels,) int64
    type: IntType
    bits: int


@dataclass
class ActivationEncoding:
    """A per-tensor activation grid: ``QuantizeLinear``/``DequantizeLinear`` with ``type``; ``clip`` is the float
    range to clip to first (None when the grid fills the type)."""

    scale: np.float32
    zero_point: int
    type: IntType
    bits: int
    clip: tuple[float, float] | None


def _check_ready(q: Quantizer, what: str) -> None:
    if not bool(q.initialized):
        raise ExportError(f"{what}: the quantizer's range was never set (an uncalibrated model)")


@torch.no_grad()
def weight_encoding(layer: QModuleMixin, name: str, opset: int | None) -> WeightEncoding:
    """The integer storage of ``layer``'s weight at ``opset`` (None: the narrowest type, whatever its opset).

    Raises:
        OpsetTooLowError: no type for the grid exists at ``opset``.
    """
    wq = layer.weight_quantizer
    what = f"layer {name!r} ({wq.bits}-bit weights)"
    _check_ready(wq, what)
    zero_point = _zero_points(wq)
    fitting = _fitting_types(wq.bits, wq.signed, zero_point, _preferred_widths(wq.bits), (8, 16))
    chosen = _choose(fitting, opset, what)
    codes = wq.int_codes(layer.weight.detach().float()).cpu().numpy().astype(np.int64)
    return WeightEncoding(codes=codes, scale=_step(wq), zero_point=zero_point, type=chosen, bits=wq.bits)


def _activation_grid(q: Quantizer, what: str, opset: int | None) -> ActivationEncoding:
    """The ``QuantizeLinear`` storage of a per-tensor activation grid (an 8-bit container, clipped to the grid)."""
    _check_ready(q, what)
    zero_point = _zero_points(q)
    chosen = _choose(_fitting_types(q.bits, q.signed, zero_point, (8,), (16,)), opset, what)
    scale = _step(q).reshape(())
    zp = int(zero_point.reshape(()))
    clip = None
    if (chosen.lo, chosen.hi) != (q.qmin, q.qmax):
        # QuantizeLinear saturates to the type, not the grid. Clipping to (q - zp) * s first is exact: that
        # float32 product divided by s again rounds back to q - zp.
        clip = (float(np.float32(q.qmin - zp) * scale), float(np.float32(q.qmax - zp) * scale))
    return ActivationEncoding(scale=np.float32(scale), zero_point=zp, type=chosen, bits=q.bits, clip=clip)


def activation_encoding(layer: QModuleMixin, name: str, opset: int | None) -> ActivationEncoding | None:
    """The ``QuantizeLinear`` storage of ``layer``'s input grid, or None for float inputs."""
    iq = layer.input_quantizer
    if iq is None or not iq.enabled:
        return None
    return _activation_grid(iq, f"layer {name!r} ({iq.bits}-bit inputs)", opset)


def output_encoding(layer: QModuleMixin, name: str, opset: int | None) -> ActivationEncoding | None:
    """The ``QuantizeLinear`` storage of ``layer``'s output grid (``residual_output_bits``), or None when the
    layer's output stays float."""
    oq = layer.output_quantizer
    if oq is None or not oq.enabled:
        return None
    return _activation_grid(oq, f"layer {name!r} ({oq.bits}-bit outputs)", opset)
