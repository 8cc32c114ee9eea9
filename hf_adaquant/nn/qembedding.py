"""Embedding tables stored at a few bits per value: one step and zero-point per row (per token).

The word embeddings are most of a small BERT's weights (47 MB of MiniLM's 90 MB) yet no layer of the method
quantizes them: a lookup has no multiply-accumulates. :class:`QEmbedding` puts each row on its own unsigned
``bits``-bit min-max grid, ``value = (code - zero_point) * step``, and keeps that grid-point table as its weight
(fake quantization, as the quantized layers do), so the quantized model computes with exactly the table the
checkpoint, the packed model (:class:`FrozenQEmbedding`) and the ONNX file store.

Every representation rebuilds a value with :func:`dequantize_rows` (integer code minus zero-point, as float32, times
the step), so all of them give bitwise the same numbers.
"""

from __future__ import annotations

import fnmatch
import logging
import math

import torch
from torch import nn

from ..quant.functional import qparams_from_range
from ..quant.packing import container_bits, pack_codes, unpack_codes

__all__ = ["FrozenQEmbedding", "QEmbedding", "dequantize_rows", "pack_rows", "quantize_embeddings_",
           "quantized_embeddings", "row_nbytes", "unpack_rows"]

_logger = logging.getLogger(__name__)
_MIN_BITS, _MAX_BITS = 2, 8


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not _MIN_BITS <= bits <= _MAX_BITS:
        raise ValueError(f"embedding bits must be an integer in {_MIN_BITS}..{_MAX_BITS}, got {bits!r}")
    return bits


def row_nbytes(dim: int, bits: int) -> int:
    """Bytes one packed row of ``dim`` codes takes (each row starts on a byte, so rows can be gathered packed)."""
    return math.ceil(dim / (8 // container_bits(bits)))


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, dim)`` unsigned codes as a ``(rows, row_nbytes)`` uint8 tensor, each row packed on its own."""
    rows, dim = codes.shape
    width = row_nbytes(dim, bits) * (8 // container_bits(bits))
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, width - dim))
    return pack_codes(padded, bits).reshape(rows, -1)


def unpack_rows(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows` on any ``(..., row_nbytes)`` selection of rows: ``int64`` codes ``(..., dim)``."""
    if container_bits(bits) == 8:
        return packed.to(torch.int64)
    per_byte = 8 // container_bits(bits)
    codes = unpack_codes(packed.reshape(-1), bits, packed.numel() * per_byte)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :dim]


def dequantize_rows(codes: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``(code - zero_point) * step`` in float32, ``step``/``zero_point`` holding one value per row of ``codes``
    (the same float operations as ONNX ``Cast``, ``Sub``, ``Mul`` in the exported graph)."""
    return (codes.to(torch.float32) - zero_point.to(torch.float32).unsqueeze(-1)) * step.unsqueeze(-1)


class QEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table lies on a per-row ``bits``-bit grid (steps ``weight_scale``, integer
    ``weight_zero_point``); ``weight`` holds the grid points, so ``forward`` is ``nn.Embedding``'s."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, padding_idx: int | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, device=device)
        self.bits = _check_bits(bits)
        self.weight.requires_grad_(False)
        self.register_buffer("weight_scale", torch.ones(num_embeddings, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(num_embeddings, dtype=torch.int32, device=device))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, per-row"

    @classmethod
    @torch.no_grad()
    def from_float(cls, module: nn.Embedding, bits: int = 8) -> "QEmbedding":
        """The quantized twin of ``module``: each row's min-max range (widened to include 0) on ``bits`` bits."""
        if module.max_norm is not None:
            raise ValueError("an nn.Embedding with max_norm renormalises its table in forward; it stays float")
        weight = module.weight.detach().float()
        q = cls(module.num_embeddings, module.embedding_dim, bits, module.padding_idx, device=weight.device)
        step, zero_point, _ = qparams_from_range(weight.amin(dim=1), weight.amax(dim=1), bits, symmetric=False)
        codes = torch.clamp(torch.round(weight / step.unsqueeze(1)) + zero_point.unsqueeze(1), 0, 2**bits - 1)
        q.set_codes(codes, step, zero_point)
        return q

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, step: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Load integer codes ``(rows, dim)`` with their per-row steps and zero-points."""
        self.weight_scale.copy_(step.float())
        self.weight_zero_point.copy_(zero_point.to(torch.int32))
        self.weight.copy_(dequantize_rows(codes, self.weight_scale, self.weight_zero_point))

    @torch.no_grad()
    def int_codes(self) -> torch.Tensor:
        """The unsigned integer codes ``(rows, dim)`` of the table (``int64``; exact: the table is on the grid)."""
        step = self.weight_scale.unsqueeze(1)
        codes = torch.round(self.weight.float() / step) + self.weight_zero_point.unsqueeze(1).float()
        return codes.to(torch.int64)


class FrozenQEmbedding(QEmbedding):
    """:class:`QEmbedding` holding the packed codes (``weight_packed``: ``(rows, row_nbytes)`` uint8, as the
    checkpoint stores them) instead of a float32 table; ``forward`` gathers packed rows, then dequantizes only
    those: bitwise the unfrozen model's outputs."""

    weight_packed: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        codes = unpack_rows(self.weight_packed, self.bits, self.embedding_dim)
        return dequantize_rows(codes, self.weight_scale, self.weight_zero_point)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = unpack_rows(self.weight_packed[ids], self.bits, self.embedding_dim)
        return dequantize_rows(codes, self.weight_scale[ids], self.weight_zero_point[ids])

    @classmethod
    def placeholder(cls, module: nn.Embedding, bits: int) -> "FrozenQEmbedding":
        """Empty buffers shaped as the checkpoint stores ``module``'s table (filled by a state-dict loader)."""
        frozen = cls.__new__(cls)
        nn.Module.__init__(frozen)
        frozen.num_embeddings, frozen.embedding_dim = module.num_embeddings, module.embedding_dim
        frozen.padding_idx, frozen.max_norm, frozen.norm_type = module.padding_idx, None, 2.0
        frozen.scale_grad_by_freq, frozen.sparse, frozen.bits = False, False, _check_bits(bits)
        device = module.weight.device
        rows = module.num_embeddings
        frozen.register_buffer("weight_packed", torch.zeros(rows, row_nbytes(module.embedding_dim, bits),
                                                            dtype=torch.uint8, device=device))
        frozen.register_buffer("weight_scale", torch.ones(rows, device=device))
        frozen.register_buffer("weight_zero_point", torch.zeros(rows, dtype=torch.int32, device=device))
        return frozen

    def unfrozen(self) -> QEmbedding:
        """A :class:`QEmbedding` with the same table (float32 grid points)."""
        q = QEmbedding(self.num_embeddings, self.embedding_dim, self.bits, self.padding_idx,
                       device=self.weight_packed.device)
        q.set_codes(unpack_rows(self.weight_packed, self.bits, self.embedding_dim), self.weight_scale,
                    self.weight_zero_point)
        return q


@torch.no_grad()
def freeze_embedding(module: QEmbedding) -> FrozenQEmbedding:
    """``module`` with its table replaced by packed codes, in place (its class becomes :class:`FrozenQEmbedding`)."""
    if isinstance(module, FrozenQEmbedding):
        return module
    packed = pack_rows(module.int_codes(), module.bits).to(module.weight_scale.device)
    del module.weight  # the float32 table goes; the read-only ``weight`` property takes over
    module.register_buffer("weight_packed", packed)
    module.__class__ = FrozenQEmbedding
    return module  # type: ignore[return-value]


def quantized_embeddings(model: nn.Module) -> dict[str, QEmbedding]:
    """The model's quantized embedding tables by name (packed or not)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QEmbedding)}


def _tied_tables(model: nn.Module) -> set[int]:
    """Ids of the parameters reachable under more than one name (e.g. word embeddings tied to an LM head)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def quantize_embeddings_(model: nn.Module, bits: int, exclude: list[str] | None = None) -> list[str]:
    """Replace every ``nn.Embedding`` of ``model`` by its :class:`QEmbedding`, in place; returns their names.

    Left float: tables matching an ``exclude`` pattern, tables tied to another module (an LM head reads the same
    weight as a matrix) and tables with ``max_norm`` (renormalised in forward).
    """
    tied = _tied_tables(model)
    done = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Embedding:
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude or []):
            continue
        if id(module.weight) in tied or module.max_norm is not None:
            _logger.info("embedding %r stays float (%s)", name,
                         "tied to another layer" if id(module.weight) in tied else "max_norm")
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QEmbedding.from_float(module, bits))
        done.append(name)
    return done
