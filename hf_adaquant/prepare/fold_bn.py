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

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils.batches import Batch
from .fold_apply import apply_fold, folded_replacement
from .fold_check import FOLD_TOLERANCE, SkippedFold, Unverifiable, find_wrong_folds, probe_model
from .fold_pairs import pairs_from_graph, pairs_from_order

__all__ = ["FOLD_TOLERANCE", "FoldResult", "SkippedFold", "fold_batchnorms", "folded_replacement"]

_logger = logging.getLogger(__name__)


@dataclass
class FoldResult:
    """What folding did: BN targets ``(|gamma|, beta)`` per conv name, following activation per layer name."""

    bn_targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)  # BN name -> conv it was folded into (checkpoints)
    output_activations: dict[str, str] = field(default_factory=dict)
    traced: bool = True
    verified: bool = False  # the folds were checked against the unfolded model on an example batch
    skipped: dict[str, SkippedFold] = field(default_factory=dict)  # BN name -> why it stayed unfolded


def _fold_unverified(model: nn.Module, modules: dict[str, nn.Module], pairs: list[tuple[str, str]],
                     result: FoldResult) -> None:
    for conv_name, bn_name in pairs:
        result.bn_targets[conv_name], _ = apply_fold(model, modules, conv_name, bn_name)
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


def _fold_verified(model: nn.Module, modules: dict[str, nn.Module], pairs: list[tuple[str, str]],
                   example_batch: Batch, result: FoldResult) -> None:
    """Fold the ``pairs`` that leave the output on ``example_batch`` within ``FOLD_TOLERANCE``; skip the others."""
    try:
        probe, run, reference = probe_model(model, example_batch)
        if not reference or not all(bool(torch.isfinite(t).all()) for t in reference):
            raise Unverifiable("the model's output on the example batch is "
                               + ("not finite" if reference else "not a floating tensor"))
        wrong = find_wrong_folds(probe, pairs, run, reference)
    except Unverifiable as exc:
        _fold_unverifiable(model, modules, pairs, result, str(exc))
        return
    for conv_name, bn_name in pairs:
        if bn_name in wrong:
            _skip(result, bn_name, wrong[bn_name])
            _logger.warning("BatchNorm %r left unfolded: %s; the conv does not simply feed this BN", bn_name,
                            wrong[bn_name])
        else:
            result.bn_targets[conv_name], _ = apply_fold(model, modules, conv_name, bn_name)
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
        pairs, activations = pairs_from_graph(model)
    except Exception as exc:  # torch.fx raises many types on untraceable code
        _logger.warning("model does not trace with torch.fx (%s: %s); folding BatchNorm by module order%s",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "",
                        ", verified on the example batch" if example_batch is not None else
                        " (unverified: no example batch)")
        pairs, activations = pairs_from_order(model)
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
