"""Model size accounting: what the quantized weights occupy once packed."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .calibrate import qmodules
from .nn.qembedding import quantized_embeddings, row_nbytes

__all__ = ["SizeReport", "model_size"]


@dataclass
class SizeReport:
    """Bytes of the FP32 model and of the packed quantized model (codes + per-channel step/zero-point)."""

    fp32_bytes: int
    quantized_bytes: int
    quantized_weight_bits: int  # sum over quantized layers of num_params * weight bits
    quantized_params: int

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.fp32_bytes

    @property
    def mean_weight_bits(self) -> float:
        return self.quantized_weight_bits / max(self.quantized_params, 1)


def model_size(model: nn.Module) -> SizeReport:
    """Size of ``model`` as FP32 and with its quantized layers packed.

    Packed: ``bits`` per weight (rounded up to whole bytes per layer) plus an fp32 step and zero-point per output
    channel and per input (and output) quantizer; quantized embedding tables: their packed rows plus an fp32 step
    and zero-point per row; biases and all other parameters and buffers stay fp32. The FP32 size counts the same
    tensors without any quantizer parameters.
    """
    layers = qmodules(model)
    quantizer_tensors = {id(t) for m in layers.values()
                         for q in (m.weight_quantizer, *m.activation_quantizers().values())
                         for t in list(q.parameters()) + list(q.buffers())}
    tables = quantized_embeddings(model)
    quantizer_tensors |= {id(t) for m in tables.values() for t in m.buffers()}
    float_tables = [m._parameters["weight"] for m in tables.values() if "weight" in m._parameters]
    weights = {id(m.weight) for m in layers.values()} | {id(t) for t in float_tables}
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    plain = [t for i, t in tensors.items() if i not in quantizer_tensors]
    fp32 = sum(t.numel() * 4 for t in plain) + sum(  # frozen tables hold no float weight: count what it was
        m.num_embeddings * m.embedding_dim * 4 for m in tables.values() if "weight" not in m._parameters)
    other = sum(t.numel() * 4 for t in plain if id(t) not in weights)
    other += sum(m.num_embeddings * (row_nbytes(m.embedding_dim, m.bits) + 8) for m in tables.values())
    packed = sum((m.weight.numel() * m.weight_quantizer.bits + 7) // 8 + 8 * m.weight.shape[0]
                 + 8 * len(m.activation_quantizers()) for m in layers.values())
    return SizeReport(
        fp32_bytes=int(fp32), quantized_bytes=int(other + packed),
        quantized_weight_bits=int(sum(m.weight.numel() * m.weight_quantizer.bits for m in layers.values())),
        quantized_params=int(sum(m.weight.numel() for m in layers.values())))
