"""Find the quantizable layers in execution order and decide each one's bit-widths."""

from __future__ import annotations

import fnmatch
import itertools
import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import QMODULES
from ..utils.batches import Batch, call_model
from ..utils.hooks import hooks
from ..utils.modules import eval_mode

__all__ = ["LayerInfo", "check_no_meta_tensors", "plan_layer_bits", "trace_layers"]

_logger = logging.getLogger(__name__)


@dataclass
class LayerInfo:
    """A quantizable layer as seen in one forward pass (shapes are per sample)."""

    name: str
    kind: str
    num_params: int
    macs: int  # multiply-accumulates per sample
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]


def _macs(module: nn.Module, out: torch.Tensor) -> int:
    per_sample_out = out[0].numel() if out.dim() > 1 else out.numel()
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        return int(per_sample_out * k)
    if isinstance(module, nn.Linear):
        return int(per_sample_out * module.in_features)
    return 0


def check_no_meta_tensors(model: nn.Module, max_names: int = 5) -> None:
    """Raise if a parameter or buffer of ``model`` is on the ``meta`` device (a shape without values).

    Such a model (built under ``init_empty_weights()`` or loaded with ``device_map="meta"``) cannot be
    calibrated; without this check it fails deep in the activation cache ("Cannot copy out of meta tensor").

    Raises:
        ValueError: naming the first ``max_names`` such tensors and how many there are.
    """
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False),
                              model.named_buffers(remove_duplicate=False))
    meta = [name for name, t in tensors if t is not None and t.is_meta]
    if meta:
        shown = ", ".join(meta[:max_names]) + (f", ... ({len(meta)} in all)" if len(meta) > max_names else "")
        raise ValueError(f"the model has tensors on the 'meta' device, which hold no values: {shown}. Load the "
                         "real weights before quantizing (not under init_empty_weights(), with device_map='meta' or "
                         "offloaded by device_map='auto'; e.g. model.to_empty(device='cpu') then load_state_dict, "
                         "or from_pretrained onto one device)")


@torch.no_grad()
def trace_layers(model: nn.Module, batch: Batch) -> list[LayerInfo]:
    """Run ``model`` on one batch and list its Conv2d/Linear layers in the order they execute.

    Layers never called are left out (they cannot be calibrated); layers called more than once (shared weights)
    are left out with a warning, since one quantizer cannot be fitted to several inputs the AdaQuant way.

    Raises:
        ValueError: the batch does not fit the model (the model's own error is attached), or no layer ran.
    """
    kinds = tuple(QMODULES)
    unsupported = sorted({type(m).__name__ for m in model.modules()
                          if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and type(m) not in kinds})
    if unsupported:
        _logger.warning("layers of types %s have no quantized module registered and stay in float", unsupported)
    calls: dict[str, list[LayerInfo]] = {}

    def record(mod: nn.Module, args: tuple, out: torch.Tensor, name: str) -> None:
        calls.setdefault(name, []).append(LayerInfo(
            name=name, kind=type(mod).__name__, num_params=int(mod.weight.numel()), macs=_macs(mod, out),
            input_shape=tuple(args[0].shape[1:]), output_shape=tuple(out.shape[1:])))

    recording = ((module, lambda mod, args, out, name=name: record(mod, args, out, name))
                 for name, module in model.named_modules() if type(module) in kinds)
    with hooks(recording), eval_mode(model):
        try:
            call_model(model, batch)
        except Exception as exc:
            raise ValueError(f"the calibration batch does not fit the model (batch 0): {type(exc).__name__}: "
                             f"{exc}") from exc
    shared = [n for n, c in calls.items() if len(c) > 1]
    if shared:
        _logger.warning("layers called more than once per forward are kept in float: %s", shared)
    layers = [c[0] for n, c in calls.items() if len(c) == 1]
    if not layers:
        raise ValueError("the model has no quantizable layer (Conv2d or Linear) that runs in forward; "
                         f"quantizable types: {[t.__name__ for t in kinds]}")
    return layers


def _patterns(patterns: str | list[str] | None) -> list[str] | None:
    """One pattern string is a one-pattern list (iterating it would match single characters)."""
    return [patterns] if isinstance(patterns, str) else patterns


def _matches(name: str, patterns: list[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or [])


def _bits(bits: tuple[int, int | None]) -> tuple[int, int | None]:
    return int(bits[0]), None if bits[1] is None else int(bits[1])


def plan_layer_bits(
    layers: list[LayerInfo],
    weight_bits: int,
    activation_bits: int | None,
    *,
    first_last_bits: int | None = 8,
    include: str | list[str] | None = None,
    exclude: str | list[str] | None = None,
    overrides: dict[str, tuple[int, int | None]] | None = None,
) -> dict[str, tuple[int, int | None]]:
    """``{layer name: (weight bits, activation bits)}`` for the layers to quantize, in execution order.

    Policy, applied in order: ``include`` patterns (fnmatch; one string or a list; default all) minus ``exclude``
    patterns; the first and last quantized layers at ``first_last_bits`` (None disables); then per-layer
    ``overrides``, keyed by layer name or by fnmatch pattern (``"*.conv_dw"``; exact names win over patterns).

    Raises:
        ValueError: an override names an unknown layer or a pattern matches none, or no layer is left to quantize.
    """
    include, exclude = _patterns(include), _patterns(exclude)
    selected = [l.name for l in layers if (include is None or _matches(l.name, include))
                and not _matches(l.name, exclude)]
    if not selected:
        raise ValueError(f"no quantizable layer left after include={include} exclude={exclude}; "
                         f"layers: {[l.name for l in layers]}")
    plan: dict[str, tuple[int, int | None]] = {name: (weight_bits, activation_bits) for name in selected}
    if first_last_bits is not None:
        for name in {selected[0], selected[-1]}:
            abits = None if activation_bits is None else max(first_last_bits, activation_bits)
            plan[name] = (max(first_last_bits, weight_bits), abits)
    overrides = overrides or {}
    # Glob patterns ("*.conv_dw") first, so that an exact layer name always wins over a pattern.
    patterns = [k for k in overrides if k not in plan and any(c in k for c in "*?[")]
    for pattern in patterns:
        matched = [name for name in plan if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"per-layer bits pattern {pattern!r} matches no quantized layer; "
                             f"quantized layers: {list(plan)}")
        for name in matched:
            plan[name] = _bits(overrides[pattern])
    for name, bits in overrides.items():
        if name in patterns:
            continue
        if name not in plan:
            raise ValueError(f"per-layer bits given for {name!r}, which is not a quantized layer; "
                             f"quantized layers: {list(plan)}")
        plan[name] = _bits(bits)
    return plan
