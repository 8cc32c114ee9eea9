"""Learned rounding (weight_rounding="learned"): codes stay within one step of round-to-nearest, MSE goes down."""

from __future__ import annotations

import torch
from tests.conftest import fast_config
from torch import nn

from hf_adaquant.adaquant import capture_layer_io, optimize_layer
from hf_adaquant.adaquant.rounding import LearnedRounding, annealed_beta
from hf_adaquant.calibrate import init_weight_range
from hf_adaquant.nn import QConv2d
from hf_adaquant.utils.seeding import make_generator


def _layer_and_cache(wbits: int, abits: int):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.relu(torch.randn(16, 8, 12, 12, generator=g)) for _ in range(4)]
    cache = capture_layer_io(nn.Sequential(conv), nn.Sequential(conv), "0", batches, dtype=torch.float32)
    return conv, QConv2d.from_float(conv, wbits, abits), cache


def test_learned_rounding_starts_at_float_weight_and_hard_rounds_to_floor_or_ceil() -> None:
    conv, layer, _ = _layer_and_cache(2, 8)
    init_weight_range(layer, "minmax")  # no clipping: every weight lies inside the grid
    rounding = LearnedRounding(layer.weight, layer.weight_quantizer)
    step = layer.weight_quantizer.scale.reshape(-1, 1, 1, 1)
    # h(alpha) = frac(W / s) (clamped to [0.01, 0.99]) reproduces W up to 1% of a step, except where the
    # integer zero-point shifts the grid so that the top or bottom grid point clips the weight.
    inside = (rounding.floor + rounding.zero_point >= rounding.qmin) & (rounding.floor + rounding.zero_point + 1 <= rounding.qmax)
    assert inside.float().mean() > 0.5
    err = (rounding() - conv.weight).abs() / step
    assert err[inside].max() <= 0.011
    hard = rounding.hard_weight()
    codes = torch.round(hard / step)
    assert torch.equal(codes, torch.floor(conv.weight / step) + (rounding.alpha >= 0).float())
    # The hard weight is on the grid: the normal quantizer maps it to itself.
    assert torch.allclose(layer.weight_quantizer(hard), hard, atol=1e-6)
    assert rounding.regularizer(2.0).item() > 0.05
    assert annealed_beta(0, 100) is None and annealed_beta(20, 100) == 20.0 and abs(annealed_beta(100, 100) - 2) < 1e-9


def test_optimize_layer_with_learned_rounding_lowers_mse_and_keeps_codes_adjacent() -> None:
    conv, layer, cache = _layer_and_cache(2, 4)
    config = fast_config(weight_bits=2, activation_bits=4, iterations=100, batch_size=32,
                         weight_rounding="learned")
    report = optimize_layer(layer, cache, config, make_generator(0, 0), name="conv")
    assert report.mse_after < 0.7 * report.mse_before
    assert not hasattr(layer, "weight_rounding") and "weight_rounding.alpha" not in layer.state_dict()
    step = layer.weight_quantizer.scale.detach().reshape(-1, 1, 1, 1)
    w_q = layer.quantized_weight().detach()
    # Every weight inside the (MSE-clipped) grid sits on a grid point adjacent to its float value: rounded up or
    # down, never further; clipped weights sit on the grid's end.
    zp = torch.round(layer.weight_quantizer.zero_point.detach()).reshape(-1, 1, 1, 1)
    lo, hi = (layer.weight_quantizer.qmin - zp) * step, (layer.weight_quantizer.qmax - zp) * step
    inside = (conv.weight >= lo) & (conv.weight <= hi)
    assert inside.float().mean() > 0.6  # 2-bit MSE clipping cuts the tails
    assert torch.all((w_q - conv.weight).abs()[inside] <= (step * (1 + 1e-4)).expand_as(w_q)[inside])
    assert torch.allclose(w_q[~inside], torch.minimum(torch.maximum(conv.weight, lo), hi)[~inside], atol=1e-6)
    assert torch.allclose(layer.weight, w_q, atol=1e-6)
