"""Range calibration: weight ranges from the weights, activation ranges from calibration batches."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .nn import QModuleMixin
from .quant import NonFiniteValuesError, RangeObserver, compute_range
from .utils.batches import Batch, call_model
from .utils.hooks import hooks
from .utils.logging import progress_bar

__all__ = ["calibrate_activation_ranges", "init_weight_range", "qmodules", "quantization_disabled"]


def qmodules(model: nn.Module) -> dict[str, QModuleMixin]:
    """The quantized layers of ``model`` by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QModuleMixin)}


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in float inside the block (quantizers become identities), restoring them after."""
    layers = qmodules(model).values()
    for m in layers:
        m.set_quantization_enabled(False)
    try:
        yield
    finally:
        for m in layers:
            m.set_quantization_enabled(True)


def _layer_label(name: str) -> str:
    return f"layer {name!r}" if name else "a layer"


@torch.no_grad()
def init_weight_range(layer: QModuleMixin, method: str, name: str = "") -> None:
    """Per-channel weight range by ``method`` ("minmax", "mse", "percentile").

    Raises:
        ValueError: the weights hold NaN or inf (naming the layer ``name``).
    """
    q = layer.weight_quantizer
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    lo, hi = compute_range(method, w, bits=q.bits, symmetric=q.symmetric)
    try:
        q.set_range(lo, hi)
    except ValueError as e:
        raise ValueError(f"weight range of {_layer_label(name)}: {e}") from None


@torch.no_grad()
def calibrate_activation_ranges(
    model: nn.Module, batches: Sequence[Batch], method: str, *, seed: int = 0, progress: bool = False
) -> None:
    """Set every input quantizer's range, and every output quantizer's (layers feeding a residual add), from one
    float pass over ``batches`` (bounded memory observers).

    Raises:
        ValueError: a layer's input or output holds NaN or inf (naming the layer and the calibration batch).
    """
    layers = {n: m for n, m in qmodules(model).items() if m.input_quantizer is not None}
    observers = {n: RangeObserver(seed=seed + i) for i, n in enumerate(layers)}
    # outputs: only layers that have an output quantizer, each with its own stream of random draws
    outputs = {n: m for n, m in qmodules(model).items() if m.output_quantizer is not None}
    output_observers = {n: RangeObserver(seed=seed + len(observers) + i) for i, n in enumerate(outputs)}
    current = [0]  # index of the batch being observed, for error messages

    def observe(table: dict[str, RangeObserver], what: str, name: str, x: torch.Tensor) -> None:
        try:
            table[name].update(x)
        except NonFiniteValuesError as e:
            message = f"{what} of {_layer_label(name)} on calibration batch {current[0]}: {e}"
            raise NonFiniteValuesError(message) from None

    observing = ((m, lambda mod, args, n=n: observe(observers, "input", n, args[0])) for n, m in layers.items())
    observing_outputs = ((m, lambda mod, args, out, n=n: observe(output_observers, "output", n, out))
                         for n, m in outputs.items())
    with hooks(observing, "pre"), hooks(observing_outputs), quantization_disabled(model):
        for index, batch in enumerate(progress_bar(batches, desc="calibrating ranges", disable=not progress,
                                           leave=False)):
            current[0] = index
            # the observers' error already names the layer and this batch
            call_model(model, batch, index, passthrough=(NonFiniteValuesError,))
    quantized = {**layers, **outputs}
    for what, table in (("input", observers), ("output", output_observers)):
        for name, observer in table.items():
            q = quantized[name].activation_quantizers()[what]
            try:
                q.set_range(*observer.compute(method, bits=q.bits, symmetric=q.symmetric))
            except ValueError as e:
                raise ValueError(f"{what} range of {_layer_label(name)}: {e}") from None
