"""``QModuleMixin`` and the float-type -> quantized-type registry."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn

from ..quant import Quantizer

__all__ = ["QMODULES", "QModuleMixin", "copy_weight_and_bias", "quantize_module", "register_qmodule"]

QMODULES: dict[type[nn.Module], type["QModuleMixin"]] = {}
T = TypeVar("T", bound=type)

# Activations AdaQuant applies to both sides of the layer loss (they hide errors they clip away).
OUTPUT_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "relu6": lambda y: torch.clamp(y, 0.0, 6.0),
}


def register_qmodule(float_type: type[nn.Module]) -> Callable[[T], T]:
    """Class decorator: ``quantize_module`` turns ``float_type`` instances into the decorated class."""

    def wrap(cls: T) -> T:
        if float_type in QMODULES:
            raise ValueError(f"a quantized module is already registered for {float_type.__name__}")
        if not issubclass(cls, QModuleMixin) or cls.__mro__[1] is not QModuleMixin:
            raise TypeError(f"{cls.__name__} must inherit (QModuleMixin, {float_type.__name__}) in that order")
        QMODULES[float_type] = cls
        return cls

    return wrap


class QModuleMixin:
    """Adds a per-channel weight quantizer and a per-tensor input quantizer to a float layer.

    ``input_quantizer`` is None when activations stay in float (weight-only quantization). ``output_quantizer``
    (per tensor, None unless :meth:`add_output_quantizer` gave one) quantizes the layer's output right after the
    bias, where an exported ``QuantizeLinear`` follows the Conv/Gemm node (layers feeding a residual add, see
    ``SchemeConfig.residual_output_bits``). ``output_activation``
    names the activation that follows the layer in the model ("relu", "relu6" or None). ``bn_target`` holds the
    folded BatchNorm's ``(|gamma|, beta)``: the output statistics BN tuning restores.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None

    def _init_quantizers(self, weight_bits: int, activation_bits: int | None, weight_symmetric: bool,
                         activation_symmetric: bool) -> None:
        # Quantizers are built on the CPU: put their steps beside the weights (GPU models).
        device = self.weight.device
        self.weight_quantizer = Quantizer(
            weight_bits, symmetric=weight_symmetric, channel_axis=0, num_channels=self.weight.shape[0]
        ).to(device)
        self.input_quantizer = (
            Quantizer(activation_bits, symmetric=activation_symmetric).to(device)
            if activation_bits is not None else None
        )
        self.output_quantizer: Quantizer | None = None
        self.output_activation: str | None = None
        self.bn_target: tuple[torch.Tensor, torch.Tensor] | None = None
        self.bn: nn.Module | None = None  # only present during BN tuning

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        # A layer pickled whole (torch.save(qmodel)) before output quantizers existed has no such attribute.
        if "output_quantizer" not in self._modules and "output_quantizer" not in self.__dict__:
            self.output_quantizer = None

    @classmethod
    def from_float(cls, module: nn.Module, weight_bits: int, activation_bits: int | None, *,
                   weight_symmetric: bool = False, activation_symmetric: bool = False) -> "QModuleMixin":
        raise NotImplementedError

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def activation_bits(self) -> int | None:
        return None if self.input_quantizer is None else self.input_quantizer.bits

    @property
    def output_bits(self) -> int | None:
        return None if self.output_quantizer is None else self.output_quantizer.bits

    def add_output_quantizer(self, bits: int, symmetric: bool = False) -> Quantizer:
        """Give the layer a per-tensor output quantizer (range still to be set); returns it.

        Raises:
            ValueError: the layer already has one.
        """
        if self.output_quantizer is not None:
            raise ValueError(f"{type(self).__name__} already has an output quantizer")
        self.output_quantizer = Quantizer(bits, symmetric=symmetric).to(self.bias.device)
        return self.output_quantizer

    def activation_quantizers(self) -> dict[str, Quantizer]:
        """The layer's per-tensor activation quantizers that exist, by side: ``"input"``, then ``"output"``."""
        sides = {"input": self.input_quantizer, "output": self.output_quantizer}
        return {side: q for side, q in sides.items() if q is not None}

    def set_quantization_enabled(self, enabled: bool) -> None:
        self.weight_quantizer.enabled = enabled
        for q in self.activation_quantizers().values():
            q.enabled = enabled

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def quantized_weight(self) -> torch.Tensor:
        # While AdaQuant learns the rounding (adaquant/rounding.py) the weight comes from the rounding module.
        rounding = getattr(self, "weight_rounding", None)
        if rounding is not None and self.weight_quantizer.enabled:
            return rounding()
        return self.weight_quantizer(self.weight)

    def apply_output_activation(self, y: torch.Tensor) -> torch.Tensor:
        fn = OUTPUT_ACTIVATIONS.get(self.output_activation or "")
        return y if fn is None else fn(y)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's output from its Conv/Linear result (bias included): the BN being tuned, if any (it folds
        into the bias later), then the output quantizer."""
        return self.quantize_output(y if self.bn is None else self.bn(y))


@torch.no_grad()
def copy_weight_and_bias(q: nn.Module, module: nn.Module) -> None:
    """Copy a float layer's weight and bias into its quantized twin (zero bias where it had none: bias
    correction and tuning need one)."""
    q.weight.copy_(module.weight)
    q.bias.copy_(module.bias if module.bias is not None else torch.zeros_like(q.bias))


def quantize_module(module: nn.Module, weight_bits: int, activation_bits: int | None, **kwargs: bool) -> nn.Module:
    """Quantized copy of ``module`` via the registry (the only lookup)."""
    qcls = QMODULES.get(type(module))
    if qcls is None:
        raise TypeError(f"no quantized module registered for {type(module).__name__}; known: "
                        f"{[t.__name__ for t in QMODULES]}")
    return qcls.from_float(module, weight_bits, activation_bits, **kwargs)
