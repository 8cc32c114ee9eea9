"""Apply one ``conv -> BatchNorm`` fold in place, and undo it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..utils.modules import set_submodule

__all__ = ["FoldUndo", "apply_fold", "folded_replacement", "revert_fold"]


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


def folded_replacement(bn: nn.Module) -> nn.Module:
    """What stays of a folded BN: nothing, or the dropout+activation of a fused BN-act module."""
    act = getattr(bn, "act", None)
    if isinstance(act, nn.Module):
        drop = getattr(bn, "drop", None)
        return nn.Sequential(drop, act) if isinstance(drop, nn.Module) else act
    return nn.Identity()


@dataclass
class FoldUndo:
    """What one applied fold changed, to put it back."""

    conv: nn.Conv2d
    weight: torch.Tensor
    bias: torch.Tensor | None
    bn_name: str
    bn: nn.Module


def apply_fold(model: nn.Module, modules: dict[str, nn.Module], conv_name: str,
                bn_name: str) -> tuple[tuple[torch.Tensor, torch.Tensor], FoldUndo]:
    """Fold ``bn_name`` into ``conv_name`` in place and drop the BN; returns its ``(|gamma|, beta)`` and the undo."""
    conv, bn = modules[conv_name], modules[bn_name]
    undo = FoldUndo(conv, conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone(),
                 bn_name, bn)
    targets = _fold_into_conv(conv, bn)
    set_submodule(model, bn_name, folded_replacement(bn))
    return targets, undo


@torch.no_grad()
def revert_fold(model: nn.Module, undo: FoldUndo) -> None:
    """Put back what :func:`apply_fold` changed (the conv's weight and bias, the BN module)."""
    undo.conv.weight.copy_(undo.weight)
    if undo.bias is None:
        undo.conv.bias = None  # the fold had added the bias
    else:
        undo.conv.bias.copy_(undo.bias)
    set_submodule(model, undo.bn_name, undo.bn)
