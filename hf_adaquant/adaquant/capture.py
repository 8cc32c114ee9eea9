"""Capture of layer inputs and outputs by forward hooks, each forward pass stopped right after the layer.

Later layers never run: a capture costs the forward work up to the layer. Whole-model captures live here; the
staged engine (:mod:`hf_adaquant.adaquant.staged`) runs one stage instead of the whole model through
:func:`capture_with`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..utils.batches import Batch, call_model
from ..utils.hooks import hooks
from ..utils.modules import eval_mode
from .iocache import IOCache, NonFiniteActivationError
from .spill import CacheBudget, SpillDir

__all__ = ["StopForward", "capture_layer_io", "capture_layer_outputs", "capture_layers_io", "capture_with",
           "model_calls", "observe_outputs"]


class StopForward(Exception):
    """Raised by a capture hook once the layer of interest has run (the caller catches it: the capture is done)."""


@torch.no_grad()
def capture_with(module: nn.Module, layer: str, calls: Sequence[Callable[[], Any]], on_input, on_output) -> None:
    """Hook ``module`` (the layer named ``layer``) and run each of ``calls``; each run stops right at the layer.

    ``on_input(x)`` gets the layer's first input (without ``on_output`` the run stops *before* the layer: its
    quantizers may not be initialised yet), ``on_output(y)`` its output. A call is the whole model on one batch
    or one stage of it (:mod:`hf_adaquant.adaquant.staged`); call ``i`` is named as calibration batch ``i``.
    """

    def pre_hook(mod: nn.Module, args: tuple) -> None:
        on_input(args[0])
        raise StopForward

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if on_input is not None:
            on_input(args[0])
        on_output(out)
        raise StopForward

    hooked = hooks([(module, hook)]) if on_output is not None else hooks([(module, pre_hook)], "pre")
    with hooked:
        for index, call in enumerate(calls):
            try:
                call()
            except StopForward:
                continue
            except NonFiniteActivationError as e:
                raise NonFiniteActivationError(f"{e} on calibration batch {index}") from None
            raise RuntimeError(f"layer {layer!r} did not run during the forward pass")


def model_calls(model: nn.Module, batches: Sequence[Batch]) -> list[Callable[[], Any]]:
    """One call of ``model`` per batch; a model error names the batch, the capture hooks' own exceptions pass."""
    passthrough = (StopForward, NonFiniteActivationError)
    return [lambda b=b, i=i: call_model(model, b, i, passthrough=passthrough) for i, b in enumerate(batches)]


@torch.no_grad()
def _capture(model: nn.Module, layer: str, batches: Sequence[Batch], on_input, on_output) -> None:
    with eval_mode(model):
        capture_with(model.get_submodule(layer), layer, model_calls(model, batches), on_input, on_output)


@torch.no_grad()
def observe_outputs(model: nn.Module, layers: Sequence[str], batches: Sequence[Batch],
                    on_output: Callable[[str, torch.Tensor], None]) -> None:
    """Full forward passes over ``batches`` calling ``on_output(name, output)`` for each named layer (mode kept)."""
    with hooks((model.get_submodule(name), lambda mod, args, out, name=name: on_output(name, out))
               for name in layers):
        for batch in batches:
            call_model(model, batch)


def capture_layer_outputs(model: nn.Module, layer: str, batches: Sequence[Batch], on_output) -> None:
    """Call ``on_output`` with ``layer``'s output for every batch; each forward stops right after the layer."""
    _capture(model, layer, batches, None, on_output)


def capture_layer_io(
    input_model: nn.Module,
    target_model: nn.Module,
    layer: str,
    batches: Sequence[Batch],
    *,
    dtype: torch.dtype = torch.float16,
    max_bytes: int = 4 << 30,
    budget: CacheBudget | None = None,
    spill: SpillDir | None = None,
) -> IOCache:
    """Cache the input of ``layer`` in ``input_model`` and its output in ``target_model`` (the FP model).

    With ``input_model is target_model`` both come from one pass (the parallel variant); otherwise the input is
    taken from the quantized model (sequential variant) for every calibration sample.
    """
    cache = IOCache(dtype, max_bytes, name=layer, budget=budget, spill=spill)
    try:
        if input_model is target_model:
            _capture(target_model, layer, batches, cache.x.append, cache.y.append)
        else:
            _capture(input_model, layer, batches, cache.x.append, None)
            _capture(target_model, layer, batches, None, cache.y.append)
        return cache.finalize()
    except BaseException:
        cache.cleanup()
        raise


@torch.no_grad()
def capture_layers_io(
    model: nn.Module,
    layers: Sequence[str],
    batches: Sequence[Batch],
    *,
    dtype: torch.dtype = torch.float16,
    max_bytes: int = 4 << 30,
    budget: CacheBudget | None = None,
    spill: SpillDir | None = None,
) -> dict[str, IOCache]:
    """Inputs and outputs of several layers of one model in a single pass per batch (parallel variant).

    The pass stops once the last of ``layers`` has run. Callers size the group so that all caches fit
    ``max_bytes`` together; each cache gets an equal share of it before spilling to disk.
    """
    caches = {name: IOCache(dtype, max_bytes // max(len(layers), 1), name=name, budget=budget, spill=spill)
              for name in layers}
    remaining: set[str] = set()

    def make_hook(name: str):
        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name not in remaining:
                return
            caches[name].x.append(args[0])
            caches[name].y.append(out)
            remaining.discard(name)
            if not remaining:
                raise StopForward
        return hook

    try:
        with hooks((model.get_submodule(name), make_hook(name)) for name in layers), eval_mode(model):
            for index, batch in enumerate(batches):
                remaining.update(layers)
                try:  # a model error names the batch; the hooks' own exceptions pass
                    call_model(model, batch, index, passthrough=(StopForward, NonFiniteActivationError))
                except StopForward:
                    continue
                except NonFiniteActivationError as e:
                    raise NonFiniteActivationError(f"{e} on calibration batch {index}") from None
                raise RuntimeError(f"layers {sorted(remaining)} did not run during the forward pass")
            return {name: cache.finalize() for name, cache in caches.items()}
    except BaseException:
        for cache in caches.values():
            cache.cleanup()
        raise
