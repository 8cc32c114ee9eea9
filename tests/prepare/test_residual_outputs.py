"""Residual output quantizers (``residual_output_bits``): which layers feed a residual add, and what they get."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from tests.conftest import (RESIDUAL_CNN_RESIDUAL_LAYERS, TinyCNN, assert_state_dict_equal, fit_batchnorm_stats,
                            make_batches, make_residual_cnn, randomize_batchnorms)
from torch import nn

from hf_adaquant import AdaQuantConfig, prepare_model, quantize
from hf_adaquant.prepare import fold_batchnorms
from hf_adaquant.prepare.residual_outputs import find_residual_layers


def _config(**changes: object) -> AdaQuantConfig:
    fields = dict(weight_bits=8, activation_bits=8, pipeline="light", progress=False, seed=0)
    return AdaQuantConfig(**{**fields, **changes})


def _with_output_quantizer(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if getattr(m, "output_quantizer", None) is not None]


def test_cifar_resnet20_gets_exactly_the_last_conv_of_each_block() -> None:
    """Option-A shortcuts (no shortcut conv): conv2 of each of the 9 blocks, nothing else (not conv1, whose output
    goes through a ReLU; not the stem or the head)."""
    from hf_adaquant.models import cifar_resnet20

    prepared = prepare_model(cifar_resnet20(), torch.randn(2, 3, 32, 32), _config(residual_output_bits=8))
    expected = [f"layer{s}.{b}.conv2" for s in (1, 2, 3) for b in range(3)]
    assert prepared.residual_layers == expected
    assert _with_output_quantizer(prepared.qmodel) == expected
    q = prepared.qmodel.get_submodule("layer1.0.conv2").output_quantizer
    assert q.bits == 8 and not q.symmetric and q.channel_axis is None and not bool(q.initialized)


def test_shortcut_convs_count_through_dropout_and_folded_batchnorms() -> None:
    prepared = prepare_model(make_residual_cnn(), torch.randn(2, 3, 32, 32), _config(residual_output_bits=8))
    assert prepared.residual_layers == RESIDUAL_CNN_RESIDUAL_LAYERS


def test_an_unfolded_batchnorm_or_a_relu_before_the_add_is_not_an_identity() -> None:
    model = make_residual_cnn()
    assert find_residual_layers(model, ["stem", "block1.conv1", "block1.conv2", "block2.downsample.0"]) == []
    folded = copy.deepcopy(model)
    fold_batchnorms(folded)
    assert find_residual_layers(folded, ["stem", "block1.conv1", "block1.conv2", "block2.downsample.0"]) == \
        ["block1.conv2", "block2.downsample.0"]


class _Adds(nn.Module):
    """Adds that are not residual: a parameter, a constant; and one that is, written as a tensor method."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.d = nn.Conv2d(3, 4, 1)
        self.pos = nn.Parameter(torch.zeros(1, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x) + self.pos
        b = self.b(x) + 1.0
        c = self.c(x).add(torch.relu(self.d(x)))
        return a * b * c


def test_only_adds_of_two_computed_tensors_count() -> None:
    assert find_residual_layers(_Adds(), ["a", "b", "c", "d"]) == ["c"]


class _StochasticDepthBlock(nn.Module):
    """torchvision's MBConv tail: ``result = stochastic_depth(project(x)); result += x``."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.project = nn.Conv2d(3, 3, 1)
        self.stochastic_depth = StochasticDepth(0.2, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.stochastic_depth(self.project(x))
        result += x
        return result


def test_torchvision_stochastic_depth_is_an_identity_in_eval_mode_only() -> None:
    """torch.fx keeps torchvision's ``stochastic_depth`` as one call (EfficientNet's MBConv): in eval mode
    (``training=False``) it passes the project conv's output through to the skip add; in train mode it does not."""
    pytest.importorskip("torchvision")
    block = _StochasticDepthBlock()
    assert find_residual_layers(block.eval(), ["project"]) == ["project"]
    assert find_residual_layers(block.train(), ["project"]) == []


class _Branchy(nn.Module):
    """A forward that depends on the data: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = y + x
        return self.fc(y.mean(dim=(2, 3)))


def test_a_model_that_does_not_trace_gets_none_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="hf_adaquant.prepare.residual_outputs"):
        prepared = prepare_model(_Branchy(), torch.randn(2, 3, 8, 8), _config(residual_output_bits=8))
    assert prepared.residual_layers == [] and _with_output_quantizer(prepared.qmodel) == []
    messages = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and r.name == "hf_adaquant.prepare.residual_outputs"]
    assert len(messages) == 1 and "does not trace with torch.fx" in messages[0] and "TraceError" in messages[0]
    assert "no residual output is quantized" in messages[0]


def test_weight_only_layers_and_symmetric_activations() -> None:
    model = make_residual_cnn()
    x = torch.randn(2, 3, 32, 32)
    # a weight-only scheme is refused by the config; weight-only layers of a quantized scheme get none
    # (onnxruntime's integer kernels need quantized inputs too)
    excluded = prepare_model(model, x, _config(residual_output_bits=6, layer_bits={"block1.conv2": (8, None)},
                                               activation_symmetric=True))
    assert excluded.residual_layers == ["block2.conv2", "block2.downsample.0"]
    q = excluded.qmodel.get_submodule("block2.conv2").output_quantizer
    assert q.bits == 6 and q.symmetric


@pytest.mark.parametrize("arch, expected", [
    ("resnet10t", ["layer1.0.conv2", "layer2.0.conv2", "layer2.0.downsample.1", "layer3.0.conv2",
                   "layer3.0.downsample.1", "layer4.0.conv2", "layer4.0.downsample.1"]),
    # the project conv of a block with a skip, and of the block before it (its output is that skip)
    ("tf_mobilenetv3_small_minimal_100", ["blocks.1.0.conv_pwl", "blocks.1.1.conv_pwl", "blocks.2.0.conv_pwl",
                                          "blocks.2.1.conv_pwl", "blocks.2.2.conv_pwl", "blocks.3.0.conv_pwl",
                                          "blocks.3.1.conv_pwl", "blocks.4.0.conv_pwl", "blocks.4.1.conv_pwl",
                                          "blocks.4.2.conv_pwl"]),
])
def test_timm_models(arch: str, expected: list[str]) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    prepared = prepare_model(model, torch.randn(2, 3, 64, 64), _config(residual_output_bits=8))
    assert prepared.residual_layers == expected


def test_off_by_default_the_model_is_as_before() -> None:
    """None (the default): no output quantizer anywhere, the same state dict and outputs as a run that never heard
    of the option; a model without residual adds is the same with the option on."""
    batches = make_batches(2, 8)
    model = make_residual_cnn(0, batches)
    plain = quantize(model, batches, _config())
    off = quantize(model, batches, _config(residual_output_bits=None))
    assert _with_output_quantizer(off) == [] and "residual_output_bits" not in off.hf_adaquant_report.config
    assert not any("output_quantizer" in k for k in off.state_dict())
    assert_state_dict_equal(plain.state_dict(), off.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(batches[0]), off(batches[0]))
    tiny = fit_batchnorm_stats(randomize_batchnorms(TinyCNN()), batches)
    assert_state_dict_equal(quantize(tiny, batches, _config()).state_dict(),
                            quantize(tiny, batches, _config(residual_output_bits=8)).state_dict())


@torch.no_grad()
def test_on_the_residual_outputs_are_on_their_calibrated_grids() -> None:
    batches = make_batches(2, 8)
    model = make_residual_cnn(0, batches)
    qmodel = quantize(model, batches, _config(residual_output_bits=8))
    assert _with_output_quantizer(qmodel) == RESIDUAL_CNN_RESIDUAL_LAYERS
    assert qmodel.hf_adaquant_report.config["residual_output_bits"] == 8
    outputs = {}
    hooks = [qmodel.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out))
             for n in RESIDUAL_CNN_RESIDUAL_LAYERS]
    qmodel(batches[0])
    for h in hooks:
        h.remove()
    for name in RESIDUAL_CNN_RESIDUAL_LAYERS:
        q = qmodel.get_submodule(name).output_quantizer
        codes = (outputs[name] / q.step() + q.zero_point.round()).round()
        # every output value is a grid point, and the calibrated grid is used (not saturated at one end)
        torch.testing.assert_close(q(outputs[name]), outputs[name], rtol=0, atol=1e-6)
        assert int(codes.min()) >= q.qmin and int(codes.max()) <= q.qmax and len(codes.unique()) > 32
