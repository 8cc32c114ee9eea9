"""The quantized layers' optional output quantizer: where it sits, and that it switches with the others."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_adaquant.nn import QConv2d, QLinear, quantize_module
from hf_adaquant.serialization.packed import freeze


def _calibrated(module: nn.Module, x: torch.Tensor, output_bits: int | None = 8) -> nn.Module:
    q = quantize_module(module, 8, 8, weight_symmetric=True)
    q.weight_quantizer.set_range(*(t.reshape(-1) for t in q.weight.detach().flatten(1).aminmax(dim=1)))
    q.input_quantizer.set_range(x.min().reshape(1), x.max().reshape(1))
    if output_bits is not None:
        q.add_output_quantizer(output_bits)
        with torch.no_grad():
            q.set_quantization_enabled(False)
            y = q(x)
            q.set_quantization_enabled(True)
        q.output_quantizer.set_range(y.min().reshape(1), y.max().reshape(1))
    return q.eval()


@pytest.mark.parametrize("kind", ["conv", "linear"])
@torch.no_grad()
def test_the_output_is_quantized_after_the_bias(kind: str) -> None:
    torch.manual_seed(0)
    module = nn.Conv2d(3, 4, 3, padding=1) if kind == "conv" else nn.Linear(6, 5)
    x = torch.randn(2, 3, 8, 8) if kind == "conv" else torch.randn(7, 6)
    q = _calibrated(module, x)
    assert isinstance(q, QConv2d if kind == "conv" else QLinear) and q.output_bits == 8
    w, xq = q.quantized_weight(), q.input_quantizer(x)
    before = F.conv2d(xq, w, q.bias, padding=1) if kind == "conv" else F.linear(xq, w, q.bias)
    assert torch.equal(q(x), q.output_quantizer(before))
    assert not torch.equal(q(x), before)  # the grid does change the values
    q.set_quantization_enabled(False)
    assert not q.output_quantizer.enabled and torch.equal(q(x), module(x))  # float again, all quantizers off
    q.set_quantization_enabled(True)
    assert q.output_quantizer.enabled


def test_no_output_quantizer_unless_asked() -> None:
    q = quantize_module(nn.Conv2d(3, 4, 1), 4, 8)
    assert q.output_quantizer is None and q.output_bits is None
    assert not any("output_quantizer" in k for k in q.state_dict())
    q.add_output_quantizer(8, symmetric=True)
    assert {k for k in q.state_dict() if k.startswith("output_quantizer.")} == {
        "output_quantizer.scale", "output_quantizer.zero_point", "output_quantizer.initialized"}
    assert q.output_quantizer.symmetric and q.output_quantizer.channel_axis is None
    with pytest.raises(ValueError, match="already has an output quantizer"):
        q.add_output_quantizer(8)
    with pytest.raises(RuntimeError, match="before its range was set"):
        q.output_quantizer(torch.randn(2))


@torch.no_grad()
def test_a_frozen_layer_keeps_its_output_quantizer() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = nn.Sequential(_calibrated(nn.Conv2d(3, 4, 3, padding=1), x))
    reference = model(x)
    freeze(model)
    assert model[0].output_quantizer is not None and torch.equal(model(x), reference)


@torch.no_grad()
def test_a_layer_pickled_before_output_quantizers_existed_still_runs() -> None:
    """``torch.save(qmodel)`` of a model quantized before ``output_quantizer`` existed (no such attribute in the
    pickle): it loads as a layer without one, computing what it computed."""
    import io

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    q = _calibrated(nn.Conv2d(3, 4, 3, padding=1), x, output_bits=None)
    reference = q(x)
    del q.__dict__["output_quantizer"]  # the layer as it was pickled then
    buffer = io.BytesIO()
    torch.save(nn.Sequential(q), buffer)
    buffer.seek(0)
    old = torch.load(buffer, weights_only=False)[0]
    assert old.output_quantizer is None and old.output_bits is None
    assert torch.equal(old(x), reference)
    old.set_quantization_enabled(False)
    # a layer that had one keeps it through a pickle
    with_output = _calibrated(nn.Conv2d(3, 4, 3, padding=1), x)
    buffer = io.BytesIO()
    torch.save(with_output, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert isinstance(restored.output_quantizer, nn.Module) and torch.equal(restored(x), with_output(x))
