"""BN tuning (BNT): re-estimate BatchNorm statistics of the quantized model, then fold again.

After each quantized conv that had a BatchNorm folded into it, a BatchNorm is re-inserted whose affine
parameters are the folded BN's ``(|gamma|, beta)``: the statistics the FP layer output had. One pass in train
mode with ``momentum=None`` (a cumulative average over all calibration batches, unlike the reference's single
momentum-0.1 update) re-estimates the mean and variance of the *quantized* output. Folding rescales the weight
steps, so the integer weight codes stay exactly the same.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibrate import qmodules
from ..nn import QConv2d
from ..utils.batches import Batch, call_model

__all__ = ["tune_batchnorm"]


def _insert_bn(layer: QConv2d) -> None:
    std, mean = layer.bn_target
    bn = nn.BatchNorm2d(layer.out_channels, momentum=None).to(layer.weight.device)
    with torch.no_grad():
        bn.weight.copy_(std)
        bn.bias.copy_(mean)
    layer.bn = bn


@torch.no_grad()
def _fold_bn(layer: QConv2d) -> None:
    bn, wq = layer.bn, layer.weight_quantizer
    layer.bn = None
    codes = wq.int_codes(layer.weight)
    factor = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # > 0: the BN weight is |gamma|
    wq.scale.mul_(factor)
    # Put W' exactly on the rescaled grid so re-quantizing it reproduces the same integer codes.
    zp = torch.round(wq.zero_point).reshape(-1, 1, 1, 1)
    layer.weight.copy_((codes - zp) * wq.scale.reshape(-1, 1, 1, 1))
    layer.bias.copy_((layer.bias - bn.running_mean) * factor + bn.bias)


@torch.no_grad()
def tune_batchnorm(model: nn.Module, batches: Sequence[Batch], *, progress: bool = False) -> list[str]:
    """Re-estimate and re-fold BN statistics of every quantized conv that had a folded BN. Returns their names."""
    layers = {n: m for n, m in qmodules(model).items() if isinstance(m, QConv2d) and m.bn_target is not None}
    if not layers:
        return []
    was_training = model.training
    model.eval()
    for layer in layers.values():
        _insert_bn(layer)
        layer.bn.train()  # only the re-inserted BNs use batch statistics; dropout etc. stay in eval
    try:
        for batch in tqdm(batches, desc="BN tuning", disable=not progress, leave=False):
            call_model(model, batch)
        for layer in layers.values():
            _fold_bn(layer)
    finally:
        for layer in layers.values():
            layer.bn = None
        model.train(was_training)
    return list(layers)
