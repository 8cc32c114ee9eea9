"""``export_onnx``: a quantized model as an ONNX file with integer weights, run by onnxruntime with PyTorch's numbers.

The model is traced by ``torch.onnx.export`` (``dynamo=True``) with each quantized layer's weight and input quantizer
standing in as ``DequantizeLinear`` / ``QuantizeLinear`` nodes (``torch.onnx.ops.symbolic``); the graph is then
given the integer initializers (:mod:`.graph`). Quantized embedding tables are gathered as integer codes, then
dequantized (:mod:`.embeddings`). Everything else (folded BatchNorms, biases, LayerNorm, softmax, float embeddings)
is exported as in the float model; a transformers model's attention is exported in its eager form
(:func:`.tracing.eager_attention`: the SDPA form's NaN guards cost onnxruntime about a fifth of MiniLM's time).

With its graph optimisations off, onnxruntime computes exactly what PyTorch computes, up to float summation order
(an activation within ~1e-7 of a rounding tie may take the neighbouring code). With them on (its default), layers
with 8-bit weights and activations (and, in the default ``op_style="fused"`` (:mod:`.fused`), any weights that fit
int8 whose layer feeds a requantized output or is linear) run on its integer kernels, which round each bias to a
multiple of input step x weight step; the biases of other layers are kept out of its reach (added after the layer)
so they stay exact.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import nn

from ..integrations.timm import QConv2dSame
from ..nn import QConv2d, QLinear, QModuleMixin
from ..serialization.packed import FROZEN_CLASSES
from ..utils.files import atomic_path
from .embeddings import embeddings_export_mode
from .encodings import (EXPORTER_MIN_OPSET, ActivationEncoding, ExportError, OpsetTooLowError, WeightEncoding,
                        activation_encoding, output_encoding, weight_encoding)
from .inputs import (DynamicAxes, Inputs, default_axes, dynamic_shapes, input_names, output_names, reference_outputs,
                     split_inputs, to_model_device)

try:  # the optional "onnx" extra
    import onnx

    from .fused import ASYMMETRIC_8BIT, fused_qdq
    from .graph import add_biases_after, attach_encodings, fold_weight_transposes, prune_initializers
    from .tracing import eager_attention, evaluating, export_mode, trace
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


# ------------------------------------------------------------------------------------------------------ opsets
def _encodings(layers: dict[str, QModuleMixin], opset: int | None
               ) -> tuple[dict[str, WeightEncoding], dict[str, ActivationEncoding], dict[str, ActivationEncoding]]:
    """Weight, input and output encodings by layer name (layers with float inputs or outputs left out)."""
    weights = {name: weight_encoding(layer, name, opset) for name, layer in layers.items()}
    inputs = {name: enc for name, layer in layers.items()
              if (enc := activation_encoding(layer, name, opset)) is not None}
    outputs = {name: enc for name, layer in layers.items()
               if (enc := output_encoding(layer, name, opset)) is not None}
    return weights, inputs, outputs


def resolve_opset(layers: dict[str, QModuleMixin], opset: int | None) -> int:
    """The opset asked for, checked, or the lowest one that stores every weight in its own integer type.

    Raises:
        ExportError: ``opset`` is below what the bits need (states the minimum) or outside the exporter's range.
    """
    newest = onnx.defs.onnx_opset_version()
    if opset is None:
        weights, inputs, outputs = _encodings(layers, None)
        needed = [e.type.min_opset for e in (*weights.values(), *inputs.values(), *outputs.values())]
        return max([EXPORTER_MIN_OPSET, *needed])
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    if opset > newest:
        raise ExportError(f"opset {opset} is newer than the installed onnx supports ({newest})")
    problems: list[OpsetTooLowError] = []
    for name, layer in layers.items():
        for encode in (weight_encoding, activation_encoding, output_encoding):
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


# ------------------------------------------------------------------------------------------------------ public
def export_onnx(qmodel: nn.Module, path: str | os.PathLike, example_inputs: Inputs, *, opset: int | None = None,
                dynamic_axes: DynamicAxes | None = None, op_style: str = "fused") -> Path:
    """Write ``qmodel`` (from :func:`hf_adaquant.quantize` / :func:`hf_adaquant.load_quantized`) as an ONNX file.

    Each quantized weight is an integer initializer (8-bit types for 5..8 bits, 4-bit types for 3..4 bits, 2-bit
    types for 2 bits from opset 25, else a 4-bit container) dequantized per output channel by ``DequantizeLinear``;
    each input quantizer is a ``QuantizeLinear``/``DequantizeLinear`` pair in an 8-bit container (with a ``Clip``
    to the grid below 8 bits), and so is each output quantizer (``residual_output_bits``), right after its layer's
    Conv/Gemm. Quantized embedding tables are ``uint8`` codes gathered, then dequantized per row.
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
    args, kwargs = to_model_device(qmodel, *split_inputs(example_inputs))
    opset = resolve_opset(layers, opset)
    weights, inputs, layer_outputs = _encodings(layers, opset)
    names = input_names(qmodel, args, kwargs)
    axes = default_axes(args, kwargs, names) if dynamic_axes is None else dynamic_axes
    shapes = dynamic_shapes(axes, args, kwargs, names) if axes else None
    traced: set[str] = set()
    with evaluating(qmodel), eager_attention(qmodel):
        outputs = reference_outputs(qmodel, args, kwargs)
        with export_mode(layers, weights, inputs, opset, traced, layer_outputs), embeddings_export_mode(qmodel):
            model = trace(qmodel, args, kwargs, opset, shapes, output_names(outputs))
    attach_encodings(model, weights, inputs, traced, layer_outputs)
    fold_weight_transposes(model)
    fused: set[str] = set()
    if op_style != "qdq":
        rewrite = fused_qdq(model, weights, inputs)
        fused = {name for name, form in rewrite.forms.items() if form == "fused"}
        kept = {name: reason for name, reason in rewrite.reasons.items()}
        if kept:
            _logger.info("%s op style: %d of %d layers in another form: %s", op_style, len(kept), len(weights),
                         "; ".join(f"{name or 'model'}: {reason}" for name, reason in list(kept.items())[:10]))
        asymmetric = [name or "model" for name, reason in kept.items() if reason == ASYMMETRIC_8BIT]
        if asymmetric:
            _logger.warning("%d convolutions (%s) run in float in onnxruntime, not on its int8 kernels: their 8-bit "
                            "weights have per-channel zero-points. Quantize with weight_symmetric=True to deploy "
                            "them as int8.", len(asymmetric), ", ".join(asymmetric[:5]) + (", ..." if
                                                                                          len(asymmetric) > 5 else ""))
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
