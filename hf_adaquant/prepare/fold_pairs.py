"""Which BatchNorms to fold into which conv, and which activation follows each layer (read from the model).

From the ``torch.fx`` graph (BatchNorm and activation modules kept as leaves) or, for models that do not trace,
from module registration order: see :mod:`hf_adaquant.prepare.fold_bn` for what each can get wrong.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["EVAL_IDENTITIES", "pairs_from_graph", "pairs_from_order"]

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU6_FUNCTIONS = {F.relu6}

EVAL_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout2d)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (_BatchNorm, nn.Conv2d, nn.Linear, nn.ReLU, nn.ReLU6, nn.Hardtanh) + EVAL_IDENTITIES):
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


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm) and bn.track_running_stats
            and bn.running_mean is not None and bn.num_features == conv.out_channels)


def pairs_from_graph(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """``(conv, BN)`` pairs to fold and the activation after each conv/linear, from the ``torch.fx`` graph.

    Raises whatever ``torch.fx`` raises on a model that does not trace.
    """
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
               and isinstance(modules[str(users[0].target)], EVAL_IDENTITIES)):
            users = list(users[0].users)
        if len(users) == 1:
            act = _activation_of_node(users[0], modules)
            if act:
                activations[name] = act
    return pairs, activations


def pairs_from_order(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """The same guessed from module registration order (for models that do not trace)."""
    named = [(n, m) for n, m in model.named_modules()
             if (not list(m.children()) or isinstance(m, _BatchNorm)) and not isinstance(m, EVAL_IDENTITIES)]
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
