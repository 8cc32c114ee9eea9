"""Packed integer codes of the checkpoint format; the functions live in :mod:`hf_adaquant.quant.packing` (the
quantized modules use them too, without importing the serialization package)."""

from __future__ import annotations

from typing import Any

from ..quant.packing import container_bits, pack_codes, packed_nbytes, unpack_codes

__all__ = ["check_tensor_specs", "container_bits", "pack_codes", "packed_nbytes", "unpack_codes"]


def check_tensor_specs(tensors: dict[str, Any], specs: dict[str, tuple[Any, tuple[int, ...]]]) -> None:
    """Check that every ``suffix: (dtype, shape)`` of ``specs`` is in ``tensors`` with that dtype and shape.

    Raises:
        ValueError: the first missing or mismatching tensor, naming it.
    """
    for suffix, (dtype, shape) in specs.items():
        t = tensors.get(suffix)
        if t is None:
            raise ValueError(f"tensor {suffix!r} is missing")
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"tensor {suffix!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
