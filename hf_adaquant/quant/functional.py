"""Uniform affine fake quantization with straight-through rounding (LSQ-style gradients).

``x_q = (clamp(round(x / s) + z, qmin, qmax) - z) * s``

Rounding passes the gradient straight through; clamping passes no gradient to ``x`` outside the range, while the
step ``s`` receives the LSQ gradient (``round(x/s) - x/s`` inside, ``qmin - z`` / ``qmax - z`` outside).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["fake_quantize", "fake_quantize_reference", "qparams_from_range", "qrange", "quantize_to_int",
           "round_ste"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quantize_reference(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """:func:`fake_quantize` spelled out in differentiable ops (the definition the fused version is tested
    against; also what graph tracers see)."""
    zp = round_ste(zero_point)
    q = torch.clamp(round_ste(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` summed over the dimensions that ``shape`` broadcasts (the gradient of a broadcast operand)."""
    if t.shape == shape:
        return t
    if len(shape) == 0:
        return t.sum()
    return t.sum_to_size(shape)


@functools.lru_cache(maxsize=None)
def _clamp_passes_bounds() -> bool:
    """Whether ``torch.clamp``'s backward passes the gradient of a value lying exactly on a bound.

    The reference takes whatever this torch does (recent versions: no gradient on the bound); the fused
    version asks once so that both always agree.
    """
    x = torch.tensor([0.0, 1.0], requires_grad=True)
    with torch.enable_grad():
        torch.clamp(x, 0.0, 1.0).sum().backward()
    return bool(x.grad[0] == 1)


def _flat_views(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """1-D views of ``a`` and ``b`` listing their elements in the same order, or None where that needs a copy."""
    if a.shape != b.shape:
        return None
    if a.is_contiguous() and b.is_contiguous():
        return a.view(-1), b.view(-1)
    cl = torch.channels_last
    if a.dim() == 4 and a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl):
        return a.permute(0, 2, 3, 1).reshape(-1), b.permute(0, 2, 3, 1).reshape(-1)  # NHWC storage: views
    return None


class _FakeQuantize(torch.autograd.Function):
    """:func:`fake_quantize_reference` with its gradients computed in one pass each.

    The forward gives the same values: ``clamp(round(v) + zp, qmin, qmax) - zp`` with integer-valued operands is
    computed exactly, and equals ``clamp(round(v), qmin - zp, qmax - zp)``. Per element, the output's derivative
    with respect to the step is ``round(v) - v`` inside the grid and ``q - zp`` outside (LSQ, with torch.clamp's
    convention on the bounds); it is stored in the
    forward so that the backward is a single product-and-sum. The reference's autograd graph runs ~10 elementwise
    passes over ``x`` in the backward; here one (the gradients agree up to float summation order).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                qmax: int) -> torch.Tensor:
        with torch.no_grad():
            zp = zero_point + (torch.round(zero_point) - zero_point)  # round_ste's value, sign of zero included
            v = x / scale
            r = torch.round(v)
            qz = torch.clamp(r, qmin - zp, qmax - zp)  # q - zp
            out = qz * scale
            if _clamp_passes_bounds():
                inside = qz == r
            else:  # a value exactly on a bound gets no gradient, as through torch.clamp here
                inside = torch.gt(r, qmin - zp).logical_and_(torch.lt(r, qmax - zp))
            # d out / d scale; computed last, as it overwrites r
            ds = torch.where(inside, r.sub_(v), qz) if ctx.needs_input_grad[1] else None
        need_inside = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        ctx.save_for_backward(ds, inside if need_inside else None, scale if ctx.needs_input_grad[2] else None)
        ctx.shapes = (x.shape, scale.shape, zero_point.shape)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ds, inside, scale = ctx.saved_tensors
        x_shape, scale_shape, zp_shape = ctx.shapes
        grad_x = grad_scale = grad_zp = None
        if ctx.needs_input_grad[0]:
            grad_x = _sum_to(grad * inside, x_shape)
        if ctx.needs_input_grad[1]:
            flat = _flat_views(grad, ds) if math.prod(scale_shape) == 1 else None
            if flat is not None:  # per tensor: a dot product, without a temporary the size of x
                grad_scale = torch.dot(*flat).reshape(scale_shape)
            else:
                grad_scale = _sum_to(grad * ds, scale_shape)
        if ctx.needs_input_grad[2]:  # outside the grid the output is (qmin|qmax - zp) * scale: -scale per unit
            outside = grad.masked_fill(inside, 0.0)
            if scale.shape == zp_shape:  # scale is constant along the summed dims: sum first, then scale
                grad_zp = -(_sum_to(outside, zp_shape) * scale)
            else:
                grad_zp = _sum_to(-outside * scale, zp_shape)
        return grad_x, grad_scale, grad_zp, None, None


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize ``x`` onto the grid ``(q - zero_point) * scale``, ``q`` in ``[qmin, qmax]``.

    ``scale`` and ``zero_point`` broadcast against ``x`` (per tensor or per channel). The zero-point is rounded
    with a straight-through estimator so it stays an integer in the forward pass but can be learned. When a
    gradient is needed the fused :class:`_FakeQuantize` runs (same values as :func:`fake_quantize_reference`,
    gradients up to summation order); graph tracers (ONNX export, ``torch.compile``) see the reference ops.
    """
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling() or _is_exporting()
    if not tracing and torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad
                                                     or zero_point.requires_grad):
        return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax)
    if tracing:
        return fake_quantize_reference(x, scale, zero_point, qmin, qmax)
    zp = zero_point + (torch.round(zero_point) - zero_point)
    return torch.clamp(torch.round(x / scale), qmin - zp, qmax - zp) * scale


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes of ``x`` (no gradient); ``fake_quantize`` equals ``(codes - round(zp)) * scale``."""
    with torch.no_grad():
        return torch.clamp(torch.round(x / scale) + torch.round(zero_point), qmin, qmax)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Step, zero-point and signedness of the grid that covers ``[lo, hi]`` (widened to include 0).

    Asymmetric grids are unsigned ``[0, 2^b - 1]`` with a zero-point. Symmetric grids have zero-point 0 and are
    unsigned when ``lo >= 0`` everywhere (e.g. after a ReLU), signed otherwise.
    """
    lo = torch.minimum(lo, torch.zeros_like(lo)).float()
    hi = torch.maximum(hi, torch.zeros_like(hi)).float()
    tiny = torch.finfo(torch.float32).tiny * 1e6
    if symmetric:
        signed = bool((lo < 0).any())
        qmin, qmax = qrange(bits, signed)
        max_abs = torch.maximum(lo.abs(), hi)
        scale = torch.clamp(max_abs / qmax, min=tiny)
        zero_point = torch.zeros_like(scale)
        return scale, zero_point, signed
    qmin, qmax = qrange(bits, signed=False)
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=tiny)
    zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zero_point, False
