"""Fold each BatchNorm into the conv that feeds it, and note which activation follows each layer.

The graph comes from ``torch.fx`` (BatchNorm and activation modules kept as leaves). Models that do not trace
(data-dependent control flow) fall back to module registration order: a BatchNorm registered right after a conv
with as many channels is taken as its successor, which holds for the usual ``conv -> bn -> act`` blocks. The
fallback logs a warning because it cannot see the data flow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FoldResult", "fold_batchnorms"]

_logger = logging.getLogger(__name__)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU6_FUNCTIONS = {F.relu6}


@dataclass
class FoldResult:
    """What folding did: BN targets ``(|gamma|, beta)`` per conv name, following activation per layer name."""

    bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)  # BN name -> conv it was folded into (checkpoints)
    output_activations: dict[str, str] = field(default_factory=dict)
    traced: bool = True


_EVAL_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout2d)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (_BatchNorm, nn.Conv2d, nn.Linear, nn.ReLU, nn.ReLU6, nn.Hardtanh) + _EVAL_IDENTITIES):
            return True
        return super().is_leaf_module(m, qualname)


def _activation_of_module(m: nn.Module) -> str | None:
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0 and m.max_val == 6.0):
        return "relu6"
    return None


def _bn_own_activation(bn: nn.Module) -> str | None:
    """timm's BatchNormAct2d applies its activation itself."""
    act = getattr(bn, "act", None)
    return _activation_of_module(act) if isinstance(act, nn.Module) else None


def _activation_of_node(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _activation_of_module(modules[str(node.target)])
    if node.op == "call_function":
        if node.target in _RELU_FUNCTIONS:
            return "relu"
        if node.target in _RELU6_FUNCTIONS:
            return "relu6"
        if node.target is F.hardtanh and node.args[1:3] == (0.0, 6.0):
            return "relu6"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


@torch.no_grad()
def _fold_into_conv(conv: nn.Conv2d, bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    factor = gamma / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
    new_bias = (bias - bn.running_mean) * factor + beta
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)
    return gamma.detach().abs().clone(), beta.detach().clone()


def _replacement_for(bn: nn.Module) -> nn.Module:
    """What stays of a folded BN: nothing, or the dropout+activation of a fused BN-act module."""
    act = getattr(bn, "act", None)
    if isinstance(act, nn.Module):
        drop = getattr(bn, "drop", None)
        return nn.Sequential(drop, act) if isinstance(drop, nn.Module) else act
    return nn.Identity()


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm) and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def _pairs_from_graph(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    pairs: list[tuple[str, str]] = []
    activations: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], (nn.Conv2d, nn.Linear)):
            continue
        name = str(node.target)
        out = node
        users = list(out.users)
        if len(users) == 1 and users[0].op == "call_module":
            succ_name = str(users[0].target)
            if _foldable(modules[name], modules[succ_name]):
                pairs.append((name, succ_name))
                act = _bn_own_activation(modules[succ_name])
                if act:
                    activations[name] = act
                    continue
                out = users[0]
                users = list(out.users)
        # Modules that are identities in eval mode (timm's drop_block, dropout) may sit before the activation.
        while (len(users) == 1 and users[0].op == "call_module"
               and isinstance(modules[str(users[0].target)], _EVAL_IDENTITIES)):
            users = list(users[0].users)
        if len(users) == 1:
            act = _activation_of_node(users[0], modules)
            if act:
                activations[name] = act
    return pairs, activations


def _pairs_from_order(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    named = [(n, m) for n, m in model.named_modules()
             if (not list(m.children()) or isinstance(m, _BatchNorm)) and not isinstance(m, _EVAL_IDENTITIES)]
    pairs: list[tuple[str, str]] = []
    activations: dict[str, str] = {}
    for i, (name, m) in enumerate(named[:-1]):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        succ_name, succ = named[i + 1]
        if _foldable(m, succ):
            pairs.append((name, succ_name))
            act = _bn_own_activation(succ)
            if act is None and i + 2 < len(named):
                act = _activation_of_module(named[i + 2][1])
        else:
            act = _activation_of_module(succ)
        if act:
            activations[name] = act
    return pairs, activations


def fold_batchnorms(model: nn.Module) -> FoldResult:
    """Fold every ``conv -> BatchNorm`` pair of ``model`` in place (the model must be in eval mode semantics).

    Returns the folded BNs' ``(|gamma|, beta)`` per conv (what BN tuning restores) and the activation that
    follows each conv/linear. Callers that must not mutate their model pass a copy.
    """
    traced = True
    try:
        pairs, activations = _pairs_from_graph(model)
    except Exception as exc:  # torch.fx raises many types on untraceable code
        _logger.warning("model does not trace with torch.fx (%s: %s); folding BatchNorm by module order",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        pairs, activations = _pairs_from_order(model)
        traced = False
    result = FoldResult(output_activations=activations, traced=traced)
    modules = dict(model.named_modules())
    for conv_name, bn_name in pairs:
        result.bn_targets[conv_name] = _fold_into_conv(modules[conv_name], modules[bn_name])
        result.folded[bn_name] = conv_name
        _set_submodule(model, bn_name, _replacement_for(modules[bn_name]))
    unfolded = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if unfolded:
        _logger.info("BatchNorm layers left unfolded (not fed by a conv alone): %s", unfolded)
    return result


