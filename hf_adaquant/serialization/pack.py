"""Packed integer codes of the checkpoint format; the functions live in :mod:`hf_adaquant.quant.packing` (the
quantized modules use them too, without importing the serialization package)."""

from ..quant.packing import container_bits, pack_codes, packed_nbytes, unpack_codes

__all__ = ["container_bits", "pack_codes", "packed_nbytes", "unpack_codes"]
