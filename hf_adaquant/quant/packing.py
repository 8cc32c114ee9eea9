"""Pack integer weight codes into bytes: int8 for 5..8 bits, two int4 per byte (3..4 bits), four int2 (2 bits).

Codes are stored *unsigned* (``code - qmin``, so always in ``[0, 2^bits)``); the layer's ``signed`` flag gives
``qmin`` back. 3-bit codes use a 4-bit container: byte-aligned nibbles keep unpacking a shift and a mask, and the
loss against true 3-bit packing (25 %) is small next to the 8x saving over FP32.
"""

from __future__ import annotations

import math

import torch

__all__ = ["container_bits", "pack_codes", "packed_nbytes", "unpack_codes"]


def container_bits(bits: int) -> int:
    """Width of the slot one code occupies in the packed bytes (2, 4 or 8)."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    return 2 if bits == 2 else 4 if bits <= 4 else 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take once packed."""
    per_byte = 8 // container_bits(bits)
    return math.ceil(numel / per_byte)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat ``uint8`` tensor holding the unsigned integer ``codes`` (any shape, values in ``[0, 2^bits)``).

    Raises:
        ValueError: a code is outside ``[0, 2^bits)`` or not an integer.
    """
    slot = container_bits(bits)
    flat = codes.detach().reshape(-1).to("cpu")
    if flat.is_floating_point():
        if not torch.equal(flat, torch.round(flat)):
            raise ValueError("codes must be integers")
    flat = flat.to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) for {bits} bits, got "
                         f"[{int(flat.min())}, {int(flat.max())}]")
    per_byte = 8 // slot
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * slot
    return (groups << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as ``int64``.

    Raises:
        ValueError: ``packed`` is not a flat uint8 tensor of the size ``numel`` codes need.
    """
    slot = container_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a flat uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"{numel} codes of {bits} bits need {packed_nbytes(numel, bits)} bytes, got {packed.numel()}")
    per_byte = 8 // slot
    # on the codes' device: frozen models (hf_adaquant.freeze) unpack on the GPU in every forward
    shifts = torch.arange(per_byte, dtype=torch.int64, device=packed.device) * slot
    codes = (packed.to(torch.int64).unsqueeze(1) >> shifts) & (2**slot - 1)
    return codes.reshape(-1)[:numel]
