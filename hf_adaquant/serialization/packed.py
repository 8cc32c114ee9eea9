"""``freeze``: a quantized model that keeps its weights packed (integer codes, steps, zero-points) in memory.

A quantized model from :func:`hf_adaquant.quantize` holds a float32 weight per layer (fake quantization), as much
memory as the float model. :func:`freeze` replaces each weight by the buffers the checkpoint stores
(``weight_packed``: codes two per byte at 3..4 bits, four per byte at 2 bits; ``weight_scale``;
``weight_zero_point``, as :mod:`.layout` stores them) and rebuilds the float weight inside
``forward``, so a W4 model holds about 1/8 of the float weight bytes. The outputs are bitwise those of the unfrozen
model: the rebuilt weight is the same grid point ``(code - zero_point) * step``, computed the same way.

A frozen layer's class is a subclass of its quantized class (``FrozenQConv2d`` of ``QConv2d``...), so code that
looks for ``QModuleMixin`` layers (saving, ONNX export, size reports) still finds it; ``layer.weight`` is a read-only
property giving the rebuilt weight.
"""

from __future__ import annotations

import math

import torch
from timm.layers.padding import pad_same
from torch import nn

from ..nn import QConv2d, QLinear, QModuleMixin
from ..nn.qconv_same import QConv2dSame
from ..nn.qembedding import freeze_embedding, quantized_embeddings
from ..quant.quantizer import MIN_STEP
from .layout import pack_layer
from .pack import unpack_codes

__all__ = ["FROZEN_CLASSES", "FrozenQConv2d", "FrozenQConv2dSame", "FrozenQLinear", "FrozenWeightMixin", "freeze",
           "is_frozen"]

_PACKED_BUFFERS = ("weight_packed", "weight_scale", "weight_zero_point")


class FrozenWeightMixin:
    """Weight held as packed codes + per-channel step and zero-point buffers, dequantized on use."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    weight_shape: tuple[int, ...]

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.quantized_weight()

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        numel = math.prod(self.weight_shape)
        codes = unpack_codes(self.weight_packed, wq.bits, numel).reshape(self.weight_shape) + wq.qmin
        bshape = (-1,) + (1,) * (len(self.weight_shape) - 1)
        step = self.weight_scale.clamp(min=MIN_STEP).reshape(bshape)
        zero_point = self.weight_zero_point.to(step.dtype).reshape(bshape)
        # (code - zero_point) * step: exact integers times the step, as Quantizer's fake quantization computes it
        return (codes.to(step.dtype) - zero_point) * step


class FrozenQConv2d(FrozenWeightMixin, QConv2d):
    """``QConv2d`` with packed weights."""


class FrozenQLinear(FrozenWeightMixin, QLinear):
    """``QLinear`` with packed weights."""


class FrozenQConv2dSame(FrozenWeightMixin, QConv2dSame):
    """timm ``Conv2dSame`` (quantized) with packed weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # QConv2dSame.forward reads self.weight.shape for the padding: unpack the weight once, not twice
        weight = self.quantized_weight()
        x = pad_same(self.quantize_input(x), weight.shape[-2:], self.stride, self.dilation)
        return self.finish(self._conv_forward(x, weight, self.bias))


# The quantized layer kinds freeze knows, and their packed twins.
FROZEN_CLASSES: dict[type[QModuleMixin], type[QModuleMixin]] = {
    QConv2dSame: FrozenQConv2dSame, QConv2d: FrozenQConv2d, QLinear: FrozenQLinear}


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` is a quantized layer holding packed weights."""
    return isinstance(module, FrozenWeightMixin)


@torch.no_grad()
def _packed_tensors(layer: QModuleMixin, name: str) -> dict[str, torch.Tensor]:
    """The buffers that will replace ``layer``'s weight (checked: a known kind, calibrated, not being tuned)."""
    if type(layer) not in FROZEN_CLASSES:
        raise ValueError(f"layer {name!r} is a {type(layer).__name__}, which freeze does not know (known: "
                         f"{', '.join(c.__name__ for c in FROZEN_CLASSES)})")
    if getattr(layer, "weight_rounding", None) is not None:
        raise ValueError(f"layer {name!r} is still being optimised by AdaQuant (weight_rounding attached)")
    try:
        packed = pack_layer(layer)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from exc
    return {key: packed[key].to(layer.weight.device) for key in _PACKED_BUFFERS}


def _swap_in(layer: QModuleMixin, packed: dict[str, torch.Tensor]) -> None:
    shape = tuple(layer.weight.shape)
    del layer.weight  # drop the float32 parameter before the class's read-only ``weight`` property takes over
    for key, tensor in packed.items():
        layer.register_buffer(key, tensor)
    layer.weight_shape = shape
    layer.__class__ = FROZEN_CLASSES[type(layer)]


def freeze(qmodel: nn.Module) -> nn.Module:
    """Keep ``qmodel``'s quantized weights packed in memory, in place; returns ``qmodel``.

    Each quantized layer's float32 weight is replaced by its packed integer codes, steps and zero-points (buffers,
    moved with ``.to(device)`` and saved in ``state_dict``), dequantized inside ``forward``: outputs are bitwise
    equal, the weight memory of a W4 model about 1/8. Quantized embedding tables keep their packed codes too (a
    ``FrozenQEmbedding`` gathers packed rows, then dequantizes only those). Freezing twice is a no-op. A frozen layer's weight is a fixed
    snapshot: later changes to its quantizer's step or zero-point are not seen.

    Raises:
        ValueError: no quantized layer, a layer kind freeze does not know (named), or an uncalibrated layer.

    Example:
        >>> qmodel = freeze(hf_adaquant.load_quantized("out/r20", model=resnet20()))
    """
    layers = {name: m for name, m in qmodel.named_modules() if isinstance(m, QModuleMixin)}
    if not layers:
        raise ValueError(f"{type(qmodel).__name__} has no layer quantized by hf_adaquant: pass the model returned "
                          "by hf_adaquant.quantize or hf_adaquant.load_quantized")
    # every layer checked and packed before the first is changed: an error leaves the model as it was
    packed = {name: _packed_tensors(layer, name) for name, layer in layers.items() if not is_frozen(layer)}
    for name, tensors in packed.items():
        _swap_in(layers[name], tensors)
    for table in quantized_embeddings(qmodel).values():
        freeze_embedding(table)
    return qmodel
