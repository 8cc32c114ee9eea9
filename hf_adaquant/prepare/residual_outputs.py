"""Find the layers whose output feeds a residual add (``SchemeConfig.residual_output_bits``).

onnxruntime runs a quantized convolution on its integer kernels (``QLinearConv``) only when the convolution's
output is requantized. The last conv of a ResNet block, its shortcut conv and the project conv of an inverted
residual feed an add in float, so they run in float unless their output gets its own quantizer. This module finds
them on the ``torch.fx`` graph: a layer whose output reaches an add of two computed tensors through identities
only (``nn.Identity``, dropout, torchvision's stochastic depth in eval mode, what a folded BatchNorm leaves). A
model that does not trace gets no residual output quantizers, with a warning saying why (a guess could quantize the
wrong tensors).
"""

from __future__ import annotations

import logging
import operator
from typing import Collection

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import QModuleMixin
from .fold_pairs import EVAL_IDENTITIES

__all__ = ["add_residual_output_quantizers", "find_residual_layers"]

_logger = logging.getLogger(__name__)

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
# identities in eval mode, called as functions or tensor methods
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_IDENTITY_METHODS = {"contiguous"}


class _LayerTracer(fx.Tracer):
    """Conv/Linear layers (float or quantized, timm's Conv2dSame included) and eval-mode identities as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear, QModuleMixin) + EVAL_IDENTITIES):
            return True
        return super().is_leaf_module(m, qualname)


def _is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A single-input op that returns its input unchanged in eval mode."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if isinstance(module, EVAL_IDENTITIES):
            return True
        # what folding leaves of a fused BN-act module without an activation: Sequential(Identity, Identity)
        return isinstance(module, nn.Sequential) and all(isinstance(m, EVAL_IDENTITIES) for m in module)
    if node.op == "call_function":
        return node.target in _IDENTITY_FUNCTIONS or _is_eval_stochastic_depth(node)
    return node.op == "call_method" and node.target in _IDENTITY_METHODS


def _is_eval_stochastic_depth(node: fx.Node) -> bool:
    """torchvision's ``stochastic_depth(input, p, mode, training)`` (EfficientNet's MBConv, before its skip add):
    torch.fx keeps it as one call (``torch.fx.wrap``), an identity when traced with ``training=False``. Matched by
    name so that torchvision stays optional."""
    target = node.target
    if getattr(target, "__name__", None) != "stochastic_depth" or \
            not str(getattr(target, "__module__", "")).startswith("torchvision."):
        return False
    training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
    return training is False


def _is_residual_add(node: fx.Node) -> bool:
    """An add of two computed tensors (not of a constant or a parameter, e.g. a position embedding)."""
    if not ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in _ADD_METHODS)):
        return False
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    return len(operands) == 2 and all(a.op != "get_attr" for a in operands)


def _reaches_add(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    frontier, seen = list(node.users), set()
    while frontier:
        user = frontier.pop()
        if user in seen:
            continue
        seen.add(user)
        if _is_residual_add(user):
            return True
        if _is_identity(user, modules):
            frontier.extend(user.users)
    return False


def find_residual_layers(model: nn.Module, layers: Collection[str]) -> list[str] | None:
    """Names among ``layers`` (Conv2d/Linear modules of ``model``) whose output feeds a residual add through
    identities only, in ``layers``' order; None when ``model`` does not trace (a warning says why).

    Trace ``model`` in eval mode with its BatchNorms folded: a BN kept between a conv and the add, or a
    train-mode dropout, is not an identity.
    """
    try:
        graph = _LayerTracer().trace(model)
    except Exception as exc:  # torch.fx raises many types on untraceable code
        message = str(exc).splitlines()[0] if str(exc) else ""
        _logger.warning("residual_output_bits: the model does not trace with torch.fx (%s: %s), so no residual "
                        "output is quantized", type(exc).__name__, message[:300])
        return None
    modules = dict(model.named_modules())
    wanted = set(layers)
    found = {str(node.target) for node in graph.nodes
             if node.op == "call_module" and str(node.target) in wanted and _reaches_add(node, modules)}
    return [name for name in layers if name in found]


def add_residual_output_quantizers(fp_model: nn.Module, qmodel: nn.Module, layers: Collection[str], bits: int,
                                   symmetric: bool) -> list[str]:
    """Give each quantized layer of ``qmodel`` whose output feeds a residual add in ``fp_model`` (its folded float
    twin, same names) a per-tensor ``bits``-bit output quantizer (ranges set later, with the input ranges).
    Layers whose inputs stay float (weight-only) get none: onnxruntime's integer kernels need both sides
    quantized. Returns the names given one."""
    found = find_residual_layers(fp_model, layers)
    if found is None:
        return []
    chosen = []
    for name in found:
        layer = qmodel.get_submodule(name)
        if isinstance(layer, QModuleMixin) and layer.input_quantizer is not None:
            layer.add_output_quantizer(bits, symmetric=symmetric)
            chosen.append(name)
    _logger.info("residual_output_bits=%d: %d layers get an output quantizer: %s", bits, len(chosen),
                 ", ".join(chosen[:8]) + (", ..." if len(chosen) > 8 else ""))
    return chosen
