"""Example inputs of ``export_onnx``: split into positional / keyword inputs, moved to the model's device, run once
for reference, named, and given dynamic axes (batch; sequence for token inputs)."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .encodings import ExportError

__all__ = ["DynamicAxes", "Inputs", "default_axes", "dynamic_shapes", "input_names", "output_names",
           "reference_outputs", "split_inputs", "to_model_device"]

Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]
DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]]


def split_inputs(example_inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), {k: v for k, v in example_inputs.items() if v is not None}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ExportError(f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
                      f"got {type(example_inputs).__name__}")


def to_model_device(qmodel: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example tensors moved to the model's device (a GPU model exports as well as a CPU one)."""
    device = next((t.device for t in [*qmodel.parameters(), *qmodel.buffers()]), None)
    if device is None:
        return args, kwargs

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


@torch.no_grad()
def reference_outputs(qmodel: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return qmodel(*args, **kwargs)
    except Exception as exc:  # any failure here means the inputs do not fit the model
        raise ExportError(f"example_inputs do not fit the model ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]})") from exc


def output_names(outputs: Any) -> list[str] | None:
    """``"output"`` for one tensor, ``output_i`` for a tuple, the keys of a dict / transformers ModelOutput."""
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, Mapping) and all(isinstance(v, torch.Tensor) for v in outputs.values()):
        return list(outputs.keys())
    if isinstance(outputs, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in outputs):
        return [f"output_{i}" for i in range(len(outputs))]
    return None  # nested structures: the exporter's names



def input_names(qmodel: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    params = [p for p in inspect.signature(qmodel.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = [params[i].name if i < len(params) else f"input_{i}" for i in range(len(args))]
    return positional + list(kwargs)


def default_axes(args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str]) -> dict[str, dict[int, str]]:
    """Batch (axis 0) of every tensor input; also the sequence (axis 1) of integer keyword inputs (token ids,
    attention masks: transformers models)."""
    axes: dict[str, dict[int, str]] = {}
    for name, value in zip(names, [*args, *kwargs.values()]):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if name in kwargs and value.dim() >= 2 and not value.is_floating_point():
            axes[name][1] = "sequence"
    return axes


def dynamic_shapes(dynamic_axes: DynamicAxes, args: tuple[Any, ...], kwargs: dict[str, Any],
                    names: list[str]) -> tuple[Any, ...] | dict[str, Any]:
    unknown = sorted(set(dynamic_axes) - set(names))
    if unknown:
        raise ExportError(f"dynamic_axes names inputs {unknown} the model does not take (inputs: {names})")
    dims: dict[str, torch.export.Dim] = {}
    specs: dict[str, dict[int, Any]] = {}
    for name, value in zip(names, [*args, *kwargs.values()]):
        axes = dynamic_axes.get(name)
        if axes is None:
            continue
        named = dict(axes) if isinstance(axes, Mapping) else {int(a): f"{name}_dim{int(a)}" for a in axes}
        rank = value.dim() if isinstance(value, torch.Tensor) else 0
        for axis, dim_name in named.items():
            if not isinstance(axis, int) or not -rank <= axis < rank:
                raise ExportError(f"dynamic_axes[{name!r}]: axis {axis!r} is not an axis of a {rank}-d input")
            if not str(dim_name).isidentifier():
                raise ExportError(f"dynamic_axes[{name!r}]: dimension name {dim_name!r} must be an identifier")
            dims.setdefault(str(dim_name), torch.export.Dim(str(dim_name)))
        specs[name] = {axis % rank: dims[str(dim_name)] for axis, dim_name in named.items()}
    if kwargs:
        return {name: specs.get(name) for name in names}
    return tuple(specs.get(name) for name in names)

