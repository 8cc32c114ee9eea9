"""``Quantizer``: a fake-quantization module with a learnable step and zero-point."""

from __future__ import annotations

import torch
from torch import nn

from .functional import fake_quantize, qparams_from_range, qrange, quantize_to_int

__all__ = ["MIN_STEP", "Quantizer"]

MIN_BITS, MAX_BITS = 2, 8
# Smallest step a quantizer uses: a step an optimizer pushed to <= 0 would flip or collapse the grid. Packed
# checkpoints and exporters dequantize with the same clamp, so their values equal the fake-quantized ones.
MIN_STEP = 1e-8


def _describe(t: torch.Tensor) -> str:
    """A bound for a message: its value, or its first non-finite value and how many there are."""
    flat = t.detach().reshape(-1).float()
    if flat.numel() == 1:
        return f"{flat.item():g}"
    bad = flat[~torch.isfinite(flat)]
    return f"{bad.numel()} of {flat.numel()} channels non-finite, e.g. {bad[0].item():g}" if bad.numel() else "finite"


class Quantizer(nn.Module):
    """Uniform affine fake quantizer, per tensor (``channel_axis=None``) or per channel.

    Args:
        bits: grid width, 2..8.
        symmetric: zero-point fixed at 0 (signed grid unless the range is non-negative).
        channel_axis: axis holding the channels for per-channel steps (0 for weights), or None.
        num_channels: number of channels when per channel.

    The step (``scale``) and ``zero_point`` are parameters so AdaQuant can learn them; call :meth:`set_range`
    first. While ``enabled`` is False the module is the identity (used to get FP references).
    """

    def __init__(
        self, bits: int, *, symmetric: bool = False, channel_axis: int | None = None, num_channels: int = 1
    ) -> None:
        super().__init__()
        if not MIN_BITS <= int(bits) <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
        self.bits = int(bits)
        self.symmetric = symmetric
        self.channel_axis = channel_axis
        self.signed = False
        self.enabled = True
        n = num_channels if channel_axis is not None else 1
        self.scale = nn.Parameter(torch.ones(n))
        self.zero_point = nn.Parameter(torch.zeros(n), requires_grad=not symmetric)
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.signed)[1]

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.channel_axis is None else f"per-channel(axis={self.channel_axis})"
        return f"bits={self.bits}, {'symmetric' if self.symmetric else 'asymmetric'}, {kind}"

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set step and zero-point so the grid covers ``[lo, hi]`` (per channel or per tensor).

        Raises:
            ValueError: a bound is NaN or infinite (the grid would turn every value into NaN), or the channel
                count does not match.
        """
        bounds = torch.cat([lo.detach().reshape(-1).float(), hi.detach().reshape(-1).float()])
        if not torch.isfinite(bounds).all():
            raise ValueError(f"cannot set a quantization range from non-finite bounds [{_describe(lo)}, "
                             f"{_describe(hi)}] (NaN or inf in the weights or calibration activations)")
        scale, zero_point, signed = qparams_from_range(lo.reshape(-1), hi.reshape(-1), self.bits, self.symmetric)
        if scale.numel() != self.scale.numel():
            raise ValueError(f"range has {scale.numel()} channels, quantizer has {self.scale.numel()}")
        self.signed = signed
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.initialized.fill_(True)

    def broadcast(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``p`` (one value per channel, or one value) shaped to broadcast against ``x``."""
        if self.channel_axis is None:
            return p.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_axis] = -1
        return p.reshape(shape)

    def step(self) -> torch.Tensor:
        """The grid step actually used: ``scale`` clamped to at least :data:`MIN_STEP` (differentiable)."""
        return self.scale.clamp(min=MIN_STEP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not bool(self.initialized):
            raise RuntimeError("Quantizer used before its range was set (call calibrate/set_range first)")
        scale = self.broadcast(self.step(), x).to(x.dtype)
        zero_point = self.broadcast(self.zero_point, x).to(x.dtype)
        return fake_quantize(x, scale, zero_point, self.qmin, self.qmax)

    @torch.no_grad()
    def int_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` on this grid (values in ``[qmin, qmax]``)."""
        scale = self.broadcast(self.step(), x)
        zero_point = self.broadcast(self.zero_point, x)
        return quantize_to_int(x, scale, zero_point, self.qmin, self.qmax)
