"""Fold each BatchNorm into the conv that feeds it, and note which activation follows each layer.

The graph comes from ``torch.fx`` (BatchNorm and activation modules kept as leaves). Models that do not trace
(data-dependent control flow) fall back to module registration order: a BatchNorm registered right after a conv
with as many channels is taken as its successor, which holds for the usual ``conv -> bn -> act`` blocks but not
for a BN applied *before* a conv, or after a conv whose output also feeds a residual.

Given an example batch, folding is verified against the unfolded model: all candidate folds are applied and the
outputs compared once; only if they differ is each fold checked on its own, and a fold that changes the output
by more than ``FOLD_TOLERANCE`` (max-abs error / max-abs output over every floating output tensor, measured on a
float64 copy of the model so float32 rounding does not count) is left unfolded and reported in
:attr:`FoldResult.skipped`, with a warning naming the BN, the conv and the measured change.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..utils.batches import Batch, call_model

__all__ = ["FOLD_TOLERANCE", "FoldResult", "SkippedFold", "fold_batchnorms"]

_logger = logging.getLogger(__name__)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU6_FUNCTIONS = {F.relu6}
# Checked in float64, a correct fold changes the output by ~1e-13 relative; a wrong one by percents.
FOLD_TOLERANCE = 1e-5


@dataclass(frozen=True)
class SkippedFold:
    """A candidate ``conv -> BN`` fold left undone: it changed the model's output, or could not be checked."""

    conv: str
    relative_change: float  # max-abs output error / max-abs output on the example batch (NaN: not measured)
    reason: str = ""  # why it could not be checked, when it was not measured

    def __str__(self) -> str:
        if self.reason:
            return f"folding into {self.conv!r} could not be verified: {self.reason}"
        return (f"folding into {self.conv!r} changed the model's output by {self.relative_change:.3g} "
                f"(max-abs error / max-abs output; tolerance {FOLD_TOLERANCE:g})")


@dataclass
class FoldResult:
    """What folding did: BN targets ``(|gamma|, beta)`` per conv name, following activation per layer name."""

    bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)  # BN name -> conv it was folded into (checkpoints)
    output_activations: dict[str, str] = field(default_factory=dict)
    traced: bool = True
    verified: bool = False  # the folds were checked against the unfolded model on an example batch
    skipped: dict[str, SkippedFold] = field(default_factory=dict)  # BN name -> why it stayed unfolded


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
    """Fold ``bn`` into ``conv`` in place (torch's own conv+BN fusion math); returns BN's ``|gamma|, beta``."""
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    weight, new_bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            gamma, beta)
    conv.weight.copy_(weight)  # the same Parameter object: references to it stay valid (and the undo restores it)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias.detach(), requires_grad=conv.weight.requires_grad)
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


@dataclass
class _Undo:
    """What one applied fold changed, to put it back."""

    conv: nn.Conv2d
    weight: torch.Tensor
    bias: torch.Tensor | None
    bn_name: str
    bn: nn.Module


def _apply_fold(model: nn.Module, modules: dict[str, nn.Module], conv_name: str,
                bn_name: str) -> tuple[tuple[torch.Tensor, torch.Tensor], _Undo]:
    conv, bn = modules[conv_name], modules[bn_name]
    undo = _Undo(conv, conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone(),
                 bn_name, bn)
    targets = _fold_into_conv(conv, bn)
    _set_submodule(model, bn_name, _replacement_for(bn))
    return targets, undo


@torch.no_grad()
def _revert(model: nn.Module, undo: _Undo) -> None:
    undo.conv.weight.copy_(undo.weight)
    if undo.bias is None:
        undo.conv.bias = None  # the fold had added the bias
    else:
        undo.conv.bias.copy_(undo.bias)
    _set_submodule(model, undo.bn_name, undo.bn)


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, tuple, dict or transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out.detach()] if out.is_floating_point() and out.numel() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _relative_change(reference: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """max |out - reference| / max |reference| over all output tensors (inf when the outputs do not pair up)."""
    if len(out) != len(reference) or any(a.shape != b.shape for a, b in zip(out, reference)):
        return math.inf
    def wide(t: torch.Tensor) -> torch.Tensor:  # float64 stays float64: its precision is the point of the probe
        return t.to(torch.promote_types(t.dtype, torch.float32))

    error = max((wide(a) - wide(b)).abs().max().item() for a, b in zip(out, reference))
    scale = max(wide(b).abs().max().item() for b in reference)
    if not math.isfinite(error):
        return math.inf
    return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)


def _fold_unverified(model: nn.Module, modules: dict[str, nn.Module], pairs: list[tuple[str, str]],
                     result: FoldResult) -> None:
    for conv_name, bn_name in pairs:
        result.bn_targets[conv_name], _ = _apply_fold(model, modules, conv_name, bn_name)
        result.folded[bn_name] = conv_name


def _skip(result: FoldResult, bn_name: str, skipped: SkippedFold) -> None:
    result.skipped[bn_name] = skipped
    # The activation was found after the BN: with the BN kept, it does not follow the conv directly.
    result.output_activations.pop(skipped.conv, None)


def _fold_unverifiable(model: nn.Module, modules: dict[str, nn.Module], pairs: list[tuple[str, str]],
                       result: FoldResult, reason: str) -> None:
    """No check possible: graph-derived pairs are folded as found; pairs guessed from module order are not."""
    if result.traced:
        _logger.warning("cannot verify BatchNorm folding (%s); folding the pairs found in the traced graph", reason)
        _fold_unverified(model, modules, pairs, result)
        return
    _logger.warning("cannot verify BatchNorm folding (%s); the model does not trace, so no BatchNorm is folded: "
                    "%s", reason, [bn for _, bn in pairs])
    for conv_name, bn_name in pairs:
        _skip(result, bn_name, SkippedFold(conv_name, math.nan, reason))


class _Unverifiable(Exception):
    """Folding cannot be checked on the example batch (the message says why)."""


def _to_float64(batch: Batch) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _to_float64(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_float64(v) for v in batch)
    return batch


def _probe(model: nn.Module, example_batch: Batch) -> tuple[nn.Module, Callable[[], list[torch.Tensor]],
                                                             list[torch.Tensor]]:
    """A copy of ``model`` to try the folds on, its forward on the example batch, and its unfolded output.

    The copy runs in float64 where the model allows it: float32 rounding through a deep net reaches 1e-4 relative
    (random-weight MobileNetV3) and must not be mistaken for a wrong fold; in float64 a right fold changes the
    output by ~1e-13, a wrong one by percents.
    """
    last_error: Exception | None = None
    for to_float64 in (True, False):
        probe = copy.deepcopy(model).eval()
        batch = example_batch
        if to_float64:
            probe, batch = probe.double(), _to_float64(example_batch)

        def run(probe: nn.Module = probe, batch: Batch = batch) -> list[torch.Tensor]:
            return _output_tensors(call_model(probe, batch))

        try:
            return probe, run, run()
        except Exception as exc:  # e.g. an op without float64 support: try in the model's own dtype
            last_error = exc
    raise _Unverifiable(f"the model fails on the example batch: {type(last_error).__name__}: "
                        f"{str(last_error).splitlines()[0] if str(last_error) else ''}")


def _change(reference: list[torch.Tensor], run: Callable[[], list[torch.Tensor]]) -> float:
    """Relative change of the output; a fold that makes the forward pass fail is an infinite change."""
    try:
        return _relative_change(reference, run())
    except Exception:
        return math.inf


def _find_wrong_folds(probe: nn.Module, pairs: list[tuple[str, str]], run: Callable[[], list[torch.Tensor]],
                      reference: list[torch.Tensor]) -> dict[str, SkippedFold]:
    """BN name -> why, for the folds that change the probe's output beyond ``FOLD_TOLERANCE``."""
    modules = dict(probe.named_modules())
    applied = [_apply_fold(probe, modules, conv_name, bn_name)[1] for conv_name, bn_name in pairs]
    if _change(reference, run) <= FOLD_TOLERANCE:  # the usual case: one extra forward pass
        return {}
    for undo in reversed(applied):
        _revert(probe, undo)
    noise = _change(reference, run)
    if noise > FOLD_TOLERANCE:
        raise _Unverifiable(f"two runs of the unfolded model on the example batch differ by {noise:.3g}: "
                            "not deterministic in eval mode?")
    # Some fold is wrong: check them one at a time, each on top of the folds kept so far.
    wrong: dict[str, SkippedFold] = {}
    for conv_name, bn_name in pairs:
        _, undo = _apply_fold(probe, modules, conv_name, bn_name)
        change = _change(reference, run)
        if change > FOLD_TOLERANCE:
            _revert(probe, undo)
            wrong[bn_name] = SkippedFold(conv_name, change)
    return wrong


def _fold_verified(model: nn.Module, modules: dict[str, nn.Module], pairs: list[tuple[str, str]],
                   example_batch: Batch, result: FoldResult) -> None:
    """Fold the ``pairs`` that leave the output on ``example_batch`` within ``FOLD_TOLERANCE``; skip the others."""
    try:
        probe, run, reference = _probe(model, example_batch)
        if not reference or not all(bool(torch.isfinite(t).all()) for t in reference):
            raise _Unverifiable("the model's output on the example batch is "
                                + ("not finite" if reference else "not a floating tensor"))
        wrong = _find_wrong_folds(probe, pairs, run, reference)
    except _Unverifiable as exc:
        _fold_unverifiable(model, modules, pairs, result, str(exc))
        return
    for conv_name, bn_name in pairs:
        if bn_name in wrong:
            _skip(result, bn_name, wrong[bn_name])
            _logger.warning("BatchNorm %r left unfolded: %s; the conv does not simply feed this BN", bn_name,
                            wrong[bn_name])
        else:
            result.bn_targets[conv_name], _ = _apply_fold(model, modules, conv_name, bn_name)
            result.folded[bn_name] = conv_name
    result.verified = True


def fold_batchnorms(model: nn.Module, example_batch: Batch | None = None) -> FoldResult:
    """Fold every ``conv -> BatchNorm`` pair of ``model`` in place (the model must be in eval mode semantics).

    Returns the folded BNs' ``(|gamma|, beta)`` per conv (what BN tuning restores) and the activation that
    follows each conv/linear. Callers that must not mutate their model pass a copy.

    Args:
        example_batch: a calibration batch. When given, the folds are verified against the unfolded model on it
            (in eval mode) and any fold that changes the output beyond ``FOLD_TOLERANCE`` is undone and listed in
            ``FoldResult.skipped``. Without it, the pairs found are folded unchecked.
    """
    traced = True
    try:
        pairs, activations = _pairs_from_graph(model)
    except Exception as exc:  # torch.fx raises many types on untraceable code
        _logger.warning("model does not trace with torch.fx (%s: %s); folding BatchNorm by module order%s",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                        ", verified on the example batch" if example_batch is not None else
                        " (unverified: no example batch)")
        pairs, activations = _pairs_from_order(model)
        traced = False
    result = FoldResult(output_activations=activations, traced=traced)
    modules = dict(model.named_modules())
    if example_batch is None or not pairs:
        _fold_unverified(model, modules, pairs, result)
    else:
        with torch.no_grad():
            _fold_verified(model, modules, pairs, example_batch, result)
    unfolded = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and n not in result.skipped]
    if unfolded:
        _logger.info("BatchNorm layers left unfolded (not fed by a conv alone): %s", unfolded)
    return result
