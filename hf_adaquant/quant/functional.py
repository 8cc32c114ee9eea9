"""Uniform affine fake quantization with straight-through rounding (LSQ-style gradients).

``x_q = (clamp(round(x / s) + z, qmin, qmax) - z) * s``

Rounding passes the gradient straight through; clamping passes no gradient to ``x`` outside the range, while the
step ``s`` receives the LSQ gradient (``round(x/s) - x/s`` inside, ``qmin - z`` / ``qmax - z`` outside).
"""

from __future__ import annotations

import torch

__all__ = ["fake_quantize", "qparams_from_range", "qrange", "quantize_to_int", "round_ste"]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range ``(qmin, qmax)`` of a ``bits``-wide grid."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize ``x`` onto the grid ``(q - zero_point) * scale``, ``q`` in ``[qmin, qmax]``.

    ``scale`` and ``zero_point`` broadcast against ``x`` (per tensor or per channel). The zero-point is rounded
    with a straight-through estimator so it stays an integer in the forward pass but can be learned.
    """
    zp = round_ste(zero_point)
    q = torch.clamp(round_ste(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


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
