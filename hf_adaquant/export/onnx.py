"""``export_onnx``: a quantized model as an ONNX file with integer weights, run by onnxruntime with PyTorch's numbers.

The model is traced by ``torch.onnx.export`` (``dynamo=True``) with each quantized layer's weight and input quantizer
standing in as ``DequantizeLinear`` / ``QuantizeLinear`` nodes (``torch.onnx.ops.symbolic``); the graph is then
given the integer initializers (:mod:`.graph`). Quantized embedding tables are gathered as integer codes, then
dequantized (:mod:`.embeddings`). Everything else (folded BatchNorms, biases, LayerNorm, softmax, float embeddings)
is exported as in the float model.

With its graph optimisations off, onnxruntime computes exactly what PyTorch computes, up to float summation order
(an activation within ~1e-7 of a rounding tie may take the neighbouring code). With them on (its default), layers
with 8-bit weights and activations (and, in the default ``op_style="fused"`` (:mod:`.fused`), any weights that fit
int8 whose layer feeds a requantized output or is linear) run on its integer kernels, which round each bias to a
multiple of input step x weight step; the biases of other layers are kept out of its reach (added after the layer)
so they stay exact.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..integrations.timm import QConv2dSame
from ..nn import QConv2d, QLinear, QModuleMixin
from ..serialization.packed import FROZEN_CLASSES
from ..utils.files import atomic_path
from .embeddings import embeddings_export_mode
from .encodings import (EXPORTER_MIN_OPSET, ActivationEncoding, ExportError, OpsetTooLowError, WeightEncoding,
                        activation_encoding, weight_encoding)

try:  # the optional "onnx" extra
    import onnx

    from .graph import (QUANTIZER_KEY, add_biases_after, attach_encodings, fold_weight_transposes, prune_initializers,
                        quantizer_tag)
    from .fused import fused_qdq
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    onnx = None
    _ONNX_IMPORT_ERROR: ImportError | None = _exc
else:
    _ONNX_IMPORT_ERROR = None

__all__ = ["EXPORTABLE_LAYERS", "OP_STYLES", "export_onnx", "file_opset"]

# "fused": the QDQ graph arranged for onnxruntime's fast integer kernels (see .fused); "qdq": every quantized layer
# as DequantizeLinear -> float op (the plain form; onnxruntime dequantizes most weights on every run).
OP_STYLES = ("fused", "qdq")

_logger = logging.getLogger(__name__)

# Layers whose forward reads its weight and input only through quantized_weight() / quantize_input(): exact
# types, since a subclass may override forward (and their packed twins from freeze).
EXPORTABLE_LAYERS: tuple[type[QModuleMixin], ...] = (QConv2d, QLinear, QConv2dSame, *FROZEN_CLASSES.values())

Inputs = torch.Tensor | Sequence[Any] | Mapping[str, Any]
DynamicAxes = Mapping[str, Mapping[int, str] | Sequence[int]]


def _require_onnx() -> None:
    if onnx is None:
        raise ImportError("export_onnx needs onnx, onnxruntime and onnxscript: pip install 'hf-adaquant[onnx]'") \
            from _ONNX_IMPORT_ERROR


# ---------------------------------------------------------------------------------------------------- checking
def quantized_layers(qmodel: nn.Module) -> dict[str, QModuleMixin]:
    """The model's quantized layers by name.

    Raises:
        ExportError: no quantized layer (not a model from hf_adaquant), or a layer kind the exporter does not know.
    """
    if not isinstance(qmodel, nn.Module):
        raise ExportError(f"expected a torch.nn.Module from hf_adaquant.quantize, got {type(qmodel).__name__}")
    layers = {name: m for name, m in qmodel.named_modules() if isinstance(m, QModuleMixin)}
    if not layers:
        raise ExportError(f"{type(qmodel).__name__} has no layer quantized by hf_adaquant: pass the model returned "
                          "by hf_adaquant.quantize or hf_adaquant.load_quantized")
    for name, layer in layers.items():
        if type(layer) not in EXPORTABLE_LAYERS:
            raise ExportError(f"layer {name!r} is a {type(layer).__name__}, which export_onnx does not know how to "
                              f"export (known: {', '.join(c.__name__ for c in EXPORTABLE_LAYERS)})")
        if not layer.weight_quantizer.enabled:  # PyTorch would use the float weight, the file the codes
            raise ExportError(f"layer {name!r} has quantization switched off (set_quantization_enabled(False))")
        if getattr(layer, "weight_rounding", None) is not None or getattr(layer, "bn", None) is not None:
            raise ExportError(f"layer {name!r} is still being optimised (AdaQuant rounding or BN tuning attached)")
    return layers


def _split_inputs(example_inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), {k: v for k, v in example_inputs.items() if v is not None}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise ExportError(f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
                      f"got {type(example_inputs).__name__}")


def _to_model_device(qmodel: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example tensors moved to the model's device (a GPU model exports as well as a CPU one)."""
    device = next((t.device for t in [*qmodel.parameters(), *qmodel.buffers()]), None)
    if device is None:
        return args, kwargs

    def move(value: Any) -> Any:
        return value.to(device) if isinstance(value, torch.Tensor) else value

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


@torch.no_grad()
def _reference_outputs(qmodel: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return qmodel(*args, **kwargs)
    except Exception as exc:  # any failure here means the inputs do not fit the model
        raise ExportError(f"example_inputs do not fit the model ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]})") from exc


def _output_names(outputs: Any) -> list[str] | None:
    """``"output"`` for one tensor, ``output_i`` for a tuple, the keys of a dict / transformers ModelOutput."""
    if isinstance(outputs, torch.Tensor):
        return ["output"]
    if isinstance(outputs, Mapping) and all(isinstance(v, torch.Tensor) for v in outputs.values()):
        return list(outputs.keys())
    if isinstance(outputs, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in outputs):
        return [f"output_{i}" for i in range(len(outputs))]
    return None  # nested structures: the exporter's names


# ------------------------------------------------------------------------------------------------------ opsets
def _encodings(layers: dict[str, QModuleMixin], opset: int | None
               ) -> tuple[dict[str, WeightEncoding], dict[str, ActivationEncoding]]:
    weights = {name: weight_encoding(layer, name, opset) for name, layer in layers.items()}
    inputs = {name: enc for name, layer in layers.items()
              if (enc := activation_encoding(layer, name, opset)) is not None}
    return weights, inputs


def resolve_opset(layers: dict[str, QModuleMixin], opset: int | None) -> int:
    """The opset asked for, checked, or the lowest one that stores every weight in its own integer type.

    Raises:
        ExportError: ``opset`` is below what the bits need (states the minimum) or outside the exporter's range.
    """
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        weights, inputs = _encodings(layers, None)
        needed = [e.type.min_opset for e in (*weights.values(), *inputs.values())]
        return max([EXPORTER_MIN_OPSET, *needed])
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    if opset > newest:
        raise ExportError(f"opset {opset} is newer than the installed onnx supports ({newest})")
    problems: list[OpsetTooLowError] = []
    for name, layer in layers.items():
        for encode in (weight_encoding, activation_encoding):
            try:
                encode(layer, name, opset)
            except OpsetTooLowError as exc:
                problems.append(exc)
    minimum = max([EXPORTER_MIN_OPSET, *(p.minimum for p in problems)])
    if opset < minimum:
        detail = f"; {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "") \
            if problems else " (torch.onnx's exporter)"
        raise ExportError(f"opset {opset} is too low for this model: the minimum opset is {minimum}{detail}")
    return opset


# ------------------------------------------------------------------------------------------------ dynamic axes
def _input_names(qmodel: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    params = [p for p in inspect.signature(qmodel.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional = [params[i].name if i < len(params) else f"input_{i}" for i in range(len(args))]
    return positional + list(kwargs)


def _default_axes(args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str]) -> dict[str, dict[int, str]]:
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


def _dynamic_shapes(dynamic_axes: DynamicAxes, args: tuple[Any, ...], kwargs: dict[str, Any],
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


# ------------------------------------------------------------------------------------------------- export mode
def _symbolic_weight(layer: QModuleMixin, tag: str, enc: WeightEncoding, opset: int) -> torch.Tensor:
    # Placeholder inputs, replaced by attach_encodings: the layer's own weight (or packed codes) and quantizer
    # parameters, so the exporter can merge two of these nodes only when they hold the same values.
    wq = layer.weight_quantizer
    weight = layer._parameters.get("weight")
    weight = layer._buffers["weight_packed"] if weight is None else weight  # frozen layer
    return torch.onnx.ops.symbolic("DequantizeLinear", (weight, wq.scale, wq.zero_point), {"axis": 0},
                                   dtype=torch.float32, shape=tuple(enc.codes.shape), version=opset,
                                   metadata_props={QUANTIZER_KEY: tag})


def _symbolic_input(x: torch.Tensor, layer: QModuleMixin, tag: str, enc: ActivationEncoding,
                    opset: int) -> torch.Tensor:
    iq = layer.input_quantizer
    if enc.clip is not None:
        x = torch.clamp(x, *enc.clip)
    q = torch.onnx.ops.symbolic("QuantizeLinear", (x, iq.scale, iq.zero_point), {},
                                dtype=getattr(onnx.TensorProto, enc.type.name), shape=x.shape, version=opset,
                                metadata_props={QUANTIZER_KEY: tag})
    return torch.onnx.ops.symbolic("DequantizeLinear", (q, iq.scale, iq.zero_point), {}, dtype=torch.float32,
                                   shape=x.shape, version=opset, metadata_props={QUANTIZER_KEY: tag})


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then each module's own training flag back."""
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in training.items():
            module.training = flag


@contextlib.contextmanager
def _export_mode(layers: dict[str, QModuleMixin], weights: dict[str, WeightEncoding],
                 inputs: dict[str, ActivationEncoding], opset: int, traced: set[str]) -> Iterator[None]:
    """Route each layer's quantizers to symbolic ONNX nodes (instance attributes over the class's methods);
    the model is restored afterwards, whatever happens."""

    def weight_hook(name: str, layer: QModuleMixin) -> Any:
        def quantized_weight() -> torch.Tensor:
            traced.add(quantizer_tag(name, "weight"))
            return _symbolic_weight(layer, quantizer_tag(name, "weight"), weights[name], opset)
        return quantized_weight

    def input_hook(name: str, layer: QModuleMixin) -> Any:
        def quantize_input(x: torch.Tensor) -> torch.Tensor:
            traced.add(quantizer_tag(name, "input"))
            return _symbolic_input(x, layer, quantizer_tag(name, "input"), inputs[name], opset)
        return quantize_input

    try:
        for name, layer in layers.items():
            layer.quantized_weight = weight_hook(name, layer)
            if name in inputs:
                layer.quantize_input = input_hook(name, layer)
        yield
    finally:
        for layer in layers.values():
            layer.__dict__.pop("quantized_weight", None)
            layer.__dict__.pop("quantize_input", None)


def _trace(qmodel: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], opset: int,
           dynamic_shapes: Any, output_names: list[str] | None) -> "onnx.ModelProto":
    # torch.onnx prints progress and warns about its own internals; keep the user's console clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(qmodel, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                        dynamic_shapes=dynamic_shapes, output_names=output_names, verbose=False,
                                        external_data=False)
        except Exception as exc:
            raise ExportError(f"torch.onnx could not export the model ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:500]})") from exc
    return program.model_proto


# ------------------------------------------------------------------------------------------------------ public
def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs: Inputs, *, opset: int | None = None,
                dynamic_axes: DynamicAxes | None = None, op_style: str = "fused") -> Path:
    """Write ``qmodel`` (from :func:`hf_adaquant.quantize` / :func:`hf_adaquant.load_quantized`) as an ONNX file.

    Each quantized weight is an integer initializer (8-bit types for 5..8 bits, 4-bit types for 3..4 bits, 2-bit
    types for 2 bits from opset 25, else a 4-bit container) dequantized per output channel by ``DequantizeLinear``;
    each input quantizer is a ``QuantizeLinear``/``DequantizeLinear`` pair in an 8-bit container (with a ``Clip``
    to the grid below 8 bits). Quantized embedding tables are ``uint8`` codes gathered, then dequantized per row.
    onnxruntime then computes what the PyTorch model computes (see the module notes on its integer kernels for
    8-bit layers).

    Args:
        qmodel: the quantized model (plain PyTorch, timm or transformers). Left unchanged.
        path: the ``.onnx`` file to write; written atomically (no half-written file on failure).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs (transformers: the
            tokenizer's output, whose keys become the ONNX input names).
        opset: ONNX opset; default: the lowest that stores every weight in its own type (18, 21 with 3..4-bit
            weights, 25 with 2-bit weights).
        dynamic_axes: ``{input name: {axis: dimension name}}`` (or a list of axes); default: the batch axis of
            every input, plus the sequence axis of integer keyword inputs. ``{}`` exports static shapes.
        op_style: ``"fused"`` (default): the graph arranged for onnxruntime's fast integer kernels: weights that
            feed QLinearConv (a convolution whose output is requantized) or MatMulIntegerToFloat / QGemm (linear
            layers) reach them as int8 codes computed from the stored ones by nodes onnxruntime folds at load;
            other convolutions (float output, or 8-bit per-channel asymmetric weights) get weights dequantized by
            foldable nodes and run in float. The file keeps the stored codes; the numbers are the ``"qdq"``
            form's. ``"qdq"``: every layer as ``DequantizeLinear -> Conv/MatMul/Gemm`` (the plain form QDQ tools
            read; slower in onnxruntime, which dequantizes most weights on every run).

    Returns:
        The path written.

    Raises:
        ExportError: not a quantized model, an unknown layer kind (named), an opset too low (states the minimum),
            example inputs that do not fit the model, or a model torch.onnx cannot trace.
        ImportError: the ``onnx`` extra is not installed.

    Example:
        >>> export_onnx(qmodel, "model.onnx", torch.randn(1, 3, 224, 224))
        >>> onnxruntime.InferenceSession("model.onnx").run(None, {"x": images.numpy()})
    """
    _require_onnx()
    if op_style not in OP_STYLES:
        raise ExportError(f"op_style must be one of {', '.join(map(repr, OP_STYLES))}, got {op_style!r}")
    layers = quantized_layers(qmodel)
    args, kwargs = _to_model_device(qmodel, *_split_inputs(example_inputs))
    opset = resolve_opset(layers, opset)
    weights, inputs = _encodings(layers, opset)
    names = _input_names(qmodel, args, kwargs)
    axes = _default_axes(args, kwargs, names) if dynamic_axes is None else dynamic_axes
    shapes = _dynamic_shapes(axes, args, kwargs, names) if axes else None
    traced: set[str] = set()
    with _evaluating(qmodel):
        outputs = _reference_outputs(qmodel, args, kwargs)
        with _export_mode(layers, weights, inputs, opset, traced), embeddings_export_mode(qmodel):
            model = _trace(qmodel, args, kwargs, opset, shapes, _output_names(outputs))
    attach_encodings(model, weights, inputs, traced)
    fold_weight_transposes(model)
    fused: set[str] = set()
    if op_style != "qdq":
        rewrite = fused_qdq(model, weights, inputs)
        fused = {name for name, form in rewrite.forms.items() if form == "fused"}
        kept = {name: reason for name, reason in rewrite.reasons.items()}
        if kept:
            _logger.info("%s op style: %d of %d layers in another form: %s", op_style, len(kept), len(weights),
                         "; ".join(f"{name or 'model'}: {reason}" for name, reason in list(kept.items())[:10]))
    add_biases_after(model, {name or "model" for name, enc in weights.items()
                             if enc.type.width != 8 and name not in fused})
    prune_initializers(model.graph)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {exc}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    _logger.info("exported %d quantized layers to %s (opset %d)", len(layers), path, opset)
    return path


def file_opset(path: str | os.PathLike) -> int:
    """The default-domain opset of an ONNX file."""
    _require_onnx()
    proto = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
