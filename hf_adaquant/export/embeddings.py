"""Quantized embedding tables in the ONNX graph: integer codes gathered first, then dequantized.

Each :class:`~hf_adaquant.nn.qembedding.QEmbedding` (or its packed twin) is traced as ``Gather`` on its ``uint8``
codes ``(rows, dim)`` (one code per byte, whatever the bits: onnxruntime gathers no narrower type), ``Gather`` of the
rows' steps and zero-points, then ``Cast``, ``Sub``, ``Mul``: the float operations of
:func:`~hf_adaquant.nn.qembedding.dequantize_rows`, so the numbers are bitwise PyTorch's.

Why not ``DequantizeLinear(axis=0) -> Gather``: onnxruntime keeps ``DequantizeLinear`` out of constant folding (its
QDQ fusions need it), so that form dequantizes the whole table on every run (47 MB for MiniLM's word embeddings)
to read a few rows.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..nn.qembedding import QEmbedding, quantized_embeddings, unpack_rows

__all__ = ["EXPORT_BUFFERS", "embeddings_export_mode"]

# Temporary buffers, named "<table>.<buffer>" in the graph: codes (rows, dim) and per-row steps / zero-points
# (rows, 1), each read by a Gather.
EXPORT_BUFFERS = ("weight_quantized", "weight_row_scale", "weight_row_zero_point")


def _codes(table: QEmbedding) -> torch.Tensor:
    packed = getattr(table, "weight_packed", None)
    if packed is not None:
        return unpack_rows(packed, table.bits, table.embedding_dim).to(torch.uint8)
    return table.int_codes().to(torch.uint8)


def _export_buffers(table: QEmbedding) -> dict[str, torch.Tensor]:
    return dict(zip(EXPORT_BUFFERS, (_codes(table), table.weight_scale.float().unsqueeze(1),
                                     table.weight_zero_point.to(torch.uint8).unsqueeze(1))))


def _gather_then_dequantize(table: QEmbedding):  # noqa: ANN202 - a forward for this table
    codes_name, scale_name, zero_point_name = EXPORT_BUFFERS

    def forward(ids: torch.Tensor) -> torch.Tensor:
        codes = F.embedding(ids, getattr(table, codes_name))
        step = F.embedding(ids, getattr(table, scale_name))
        zero_point = F.embedding(ids, getattr(table, zero_point_name))
        # dequantize_rows' float operations on the gathered rows
        return (codes.to(torch.float32) - zero_point.to(torch.float32)) * step
    return forward


@contextlib.contextmanager
def embeddings_export_mode(model: nn.Module) -> Iterator[list[str]]:
    """While tracing, each quantized table of ``model`` reads its integer codes (a temporary ``uint8`` buffer)
    and dequantizes the gathered rows; the model is restored afterwards, whatever happens. Yields the names."""
    tables = quantized_embeddings(model)
    try:
        for table in tables.values():
            for name, tensor in _export_buffers(table).items():
                table.register_buffer(name, tensor)
            table.forward = _gather_then_dequantize(table)
        yield list(tables)
    finally:
        for table in tables.values():
            table.__dict__.pop("forward", None)
            for name in EXPORT_BUFFERS:
                table._buffers.pop(name, None)
