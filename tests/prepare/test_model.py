"""Model preparation: exact BatchNorm folding, activation detection, layer discovery and the bit policy."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import (
    TINY_CNN_LAYERS,
    TinyCNN,
    assert_state_dict_equal,
    fast_config,
    fit_batchnorm_stats,
    randomize_batchnorms,
    state_dict_clone,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hf_adaquant import prepare_model, quantize
from hf_adaquant.nn import QConv2d, QLinear
from hf_adaquant.prepare import fold_batchnorms, plan_layer_bits, trace_layers

timm = pytest.importorskip("timm")


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


@torch.no_grad()
def _fold_and_compare(model: nn.Module, x: torch.Tensor):
    model = model.eval()
    ref = model(x)
    folded = copy.deepcopy(model)
    result = fold_batchnorms(folded)
    out = folded(x)
    return ref, out, result, folded


# ------------------------------------------------------------------------------------------- BN folding


def test_fold_small_net_exact_with_nontrivial_stats() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorms(TinyCNN(), seed=5)
    bns = {"conv1": model.bn1, "conv2": model.bn2, "dw": model.bn3, "pw": model.bn4}
    assert any(bn.weight.min() < 0 for bn in bns.values())  # negative gammas are exercised
    x = torch.randn(8, 3, 32, 32)
    ref, out, result, folded = _fold_and_compare(model, x)
    assert result.traced
    assert (out - ref).abs().max().item() <= 1e-5
    assert _bn_count(folded) == 0
    # The folded network is a different network (BN really was non-trivial) ...
    plain = copy.deepcopy(model)
    for name in ("bn1", "bn2", "bn3", "bn4"):
        setattr(plain, name, nn.Identity())
    assert (plain(x) - ref).abs().max() > 1e-2
    # ... and the folded BNs' output statistics are recorded for BN tuning: (|gamma|, beta).
    assert set(result.bn_targets) == set(bns)
    for conv, bn in bns.items():
        std, mean = result.bn_targets[conv]
        assert torch.equal(std, bn.weight.detach().abs()) and torch.equal(mean, bn.bias.detach())
    assert result.output_activations == {"conv1": "relu", "conv2": "relu", "dw": "relu6"}
    # Convs without bias got one; the caller's copy was untouched.
    assert folded.conv1.bias is not None and model.conv1.bias is None


def test_fold_functional_relu_and_bn_without_affine() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, 4, 3)
            self.b1 = nn.BatchNorm2d(4, affine=False)
            self.c2 = nn.Conv2d(4, 4, 1)
            self.b2 = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.b1(self.c1(x)))
            return F.relu6(self.b2(self.c2(y)))

    torch.manual_seed(1)
    model = randomize_batchnorms(Net(), seed=2)
    ref, out, result, folded = _fold_and_compare(model, torch.randn(4, 3, 16, 16))
    assert (out - ref).abs().max().item() <= 1e-5
    assert _bn_count(folded) == 0
    assert result.output_activations == {"c1": "relu", "c2": "relu6"}
    assert torch.equal(result.bn_targets["c1"][0], torch.ones(4))


def test_bn_not_fed_by_conv_alone_is_left_unfolded() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # the conv output has two users: folding would change the residual

    torch.manual_seed(0)
    model = randomize_batchnorms(Net(), seed=0)
    ref, out, result, folded = _fold_and_compare(model, torch.randn(2, 3, 8, 8))
    assert result.bn_targets == {}
    assert _bn_count(folded) == 1
    assert torch.equal(out, ref)


def test_fold_timm_resnet18_exact() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model("resnet18", pretrained=False, num_classes=10), seed=3)
    ref, out, result, folded = _fold_and_compare(model, torch.randn(1, 3, 64, 64))
    assert result.traced
    assert _bn_count(folded) == 0 and len(result.bn_targets) == 20  # stem + 16 block convs + 3 downsample convs
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel.item() <= 1e-5


def test_timm_resnet18_activation_seen_through_identity_modules() -> None:
    """timm's BasicBlock runs conv1 -> bn1 -> drop_block (nn.Identity) -> act1 (ReLU).

    The ReLU after block conv1 must be found so AdaQuant applies it to both sides of the layer loss.
    """
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    result = fold_batchnorms(model)
    assert result.output_activations.get("conv1") == "relu"
    for stage in range(1, 5):
        for block in range(2):
            assert result.output_activations.get(f"layer{stage}.{block}.conv1") == "relu", (stage, block)
    assert "layer1.0.conv2" not in result.output_activations  # add before the ReLU


def test_fold_timm_mobilenetv2_batchnormact_relu6() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model("mobilenetv2_100", pretrained=False), seed=4)
    # conv name -> activation type of the BatchNormAct2d registered right after it (timm's conv -> bn blocks)
    named = list(model.named_modules())
    bn_acts = {name: type(named[i + 1][1].act) for i, (name, m) in enumerate(named)
               if isinstance(m, nn.Conv2d) and isinstance(named[i + 1][1], _BatchNorm)}
    assert len(bn_acts) == sum(isinstance(m, nn.Conv2d) for _, m in named)
    x = torch.randn(1, 3, 64, 64)
    ref, out, result, folded = _fold_and_compare(model, x)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel.item() <= 1e-4  # float32 rounding through 52 folded layers
    # In float64 the folded network is the same function up to rounding: folding itself is exact.
    ref64, out64, _, _ = _fold_and_compare(copy.deepcopy(model).double(), x.double())
    assert ((out64 - ref64).abs().max() / ref64.abs().max()).item() <= 1e-10
    assert _bn_count(folded) == 0
    assert set(result.bn_targets) == set(bn_acts)
    relu6_convs = {n for n, t in bn_acts.items() if t is nn.ReLU6}
    assert len(relu6_convs) > 30
    assert {n for n, a in result.output_activations.items() if a == "relu6"} == relu6_convs
    assert all(n not in result.output_activations for n, t in bn_acts.items() if t is nn.Identity)
    # The activation of each BatchNormAct2d survives folding.
    assert isinstance(folded.bn1, nn.Sequential) and isinstance(folded.bn1[1], nn.ReLU6)


class DataDependent(nn.Module):
    """Does not trace with torch.fx: Python control flow on a tensor value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if x.sum() > 0:
            x = x * 0.5
        else:
            x = -x
        x = self.bn2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_untraceable_model_folds_by_module_order(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(DataDependent())
    torch.manual_seed(0)
    model = randomize_batchnorms(DataDependent(), seed=6)
    with caplog.at_level(logging.WARNING, logger="hf_adaquant"):
        ref, out, result, folded = _fold_and_compare(model, torch.randn(4, 3, 16, 16))
    assert not result.traced
    assert "does not trace" in caplog.text
    assert (out - ref).abs().max().item() <= 1e-5
    assert _bn_count(folded) == 0 and set(result.bn_targets) == {"conv1", "conv2"}
    assert result.output_activations == {"conv1": "relu"}


def test_untraceable_model_quantizes(calib_batches: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    batches = [b[:, :, :16, :16] for b in calib_batches]
    model = fit_batchnorm_stats(randomize_batchnorms(DataDependent(), seed=6), batches)
    qmodel = quantize(model, batches, fast_config(weight_bits=8, activation_bits=8, pipeline="light"))
    assert isinstance(qmodel.conv1, QConv2d) and isinstance(qmodel.fc, QLinear)
    assert not any(isinstance(m, _BatchNorm) for m in qmodel.modules())
    x = batches[0]
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


class UntraceableMixedBlocks(nn.Module):
    """Untraceable; registration order suggests conv -> BN pairs that are wrong for two of them.

    conv1 -> bn1 -> relu is a real pair. bn2 is registered after conv2 but normalises conv2's *input*; bn3 follows
    conv3 but conv3's output also feeds the residual add, so folding bn3 would change the skip path too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 2
        x = self.conv2(self.bn2(x))
        y = self.conv3(x)
        x = self.bn3(y) + y
        return self.fc(x.mean(dim=(2, 3)))


def _relative_max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_untraceable_wrong_folds_are_skipped_with_example_batch(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = randomize_batchnorms(UntraceableMixedBlocks(), seed=7)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    blind = copy.deepcopy(model)
    fold_batchnorms(blind)  # without an example batch: folding by module order alone, unchecked
    with torch.no_grad():
        assert _relative_max_error(blind(x), ref) > 1e-2  # the wrong folds really change the model

    folded = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="hf_adaquant"):
        result = fold_batchnorms(folded, x)
    with torch.no_grad():
        assert _relative_max_error(folded(x), ref) <= 1e-5
    assert not result.traced and result.verified
    assert result.folded == {"bn1": "conv1"} and set(result.bn_targets) == {"conv1"}
    assert {bn: s.conv for bn, s in result.skipped.items()} == {"bn2": "conv2", "bn3": "conv3"}
    assert all(s.relative_change > 1e-5 for s in result.skipped.values())
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, _BatchNorm)
    assert isinstance(folded.bn3, _BatchNorm) and folded.conv2.bias is not None and folded.conv1.bias is not None
    assert result.output_activations.get("conv1") == "relu"
    for bn, conv in (("bn2", "conv2"), ("bn3", "conv3")):
        assert any(bn in r.getMessage() and conv in r.getMessage() and "changed the model's output" in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING), (bn, conv)
    # Other batches agree too: the kept fold is exact, the skipped BNs untouched.
    x2 = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert _relative_max_error(folded(x2), model(x2)) <= 1e-5


def test_skipped_fold_restores_a_conv_without_bias() -> None:
    class BnBeforeConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.bn(x)) if x.sum() > -1e9 else x

    torch.manual_seed(1)
    model = randomize_batchnorms(BnBeforeConv(), seed=1)
    folded = copy.deepcopy(model)
    result = fold_batchnorms(folded, torch.randn(2, 4, 6, 6))
    assert result.folded == {} and set(result.skipped) == {"bn"}
    assert folded.conv.bias is None and torch.equal(folded.conv.weight, model.conv.weight)
    assert_state_dict_equal(state_dict_clone(folded), state_dict_clone(model))


def test_untraceable_model_is_not_folded_when_the_check_cannot_run(caplog: pytest.LogCaptureFixture) -> None:
    """A batch the model cannot run leaves nothing to verify against: guessed (module-order) folds are skipped."""
    torch.manual_seed(0)
    model = randomize_batchnorms(UntraceableMixedBlocks(), seed=7)
    folded = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="hf_adaquant"):
        result = fold_batchnorms(folded, torch.randn(2, 5, 12, 12))  # 5 channels, the model takes 3
    assert not result.verified and result.folded == {} and _bn_count(folded) == 3
    assert set(result.skipped) == {"bn1", "bn2", "bn3"}
    assert "fails on the example batch" in str(result.skipped["bn1"]) and "cannot verify" in caplog.text
    assert_state_dict_equal(state_dict_clone(folded), state_dict_clone(model))


def test_traced_folding_is_verified_too(tiny_cnn: TinyCNN, calib_batches: list[torch.Tensor]) -> None:
    folded = copy.deepcopy(tiny_cnn)
    result = fold_batchnorms(folded, calib_batches[0])
    assert result.traced and result.verified and result.skipped == {}
    assert set(result.folded) == {"bn1", "bn2", "bn3", "bn4"} and _bn_count(folded) == 0
    with torch.no_grad():
        assert _relative_max_error(folded(calib_batches[1]), tiny_cnn(calib_batches[1])) <= 1e-5


def test_prepare_model_folds_only_verified_pairs(calib_batches: list[torch.Tensor]) -> None:
    batches = [b[:, :, :12, :12] for b in calib_batches]
    torch.manual_seed(0)
    model = fit_batchnorm_stats(randomize_batchnorms(UntraceableMixedBlocks(), seed=7), batches)
    prepared = prepare_model(model, batches[0], fast_config(weight_bits=8, activation_bits=8))
    assert set(prepared.fold.skipped) == {"bn2", "bn3"} and prepared.fold.folded == {"bn1": "conv1"}
    with torch.no_grad():
        assert _relative_max_error(prepared.fp_model(batches[1]), model(batches[1])) <= 1e-5
    assert prepared.qmodel.conv2.output_activation is None and prepared.qmodel.conv1.output_activation == "relu"


# ------------------------------------------------------------------------------------ caller never mutated


def test_quantize_never_mutates_the_callers_model(tiny_cnn: TinyCNN, calib_batches: list[torch.Tensor]) -> None:
    tiny_cnn.train()  # a model left in train mode must stay so, and its BN stats must not be updated
    before = state_dict_clone(tiny_cnn)
    requires = [p.requires_grad for p in tiny_cnn.parameters()]
    structure = [(n, type(m)) for n, m in tiny_cnn.named_modules()]
    qmodel = quantize(tiny_cnn, calib_batches, fast_config(iterations=5, bias_tuning_steps=2))
    assert_state_dict_equal(before, state_dict_clone(tiny_cnn))
    assert tiny_cnn.training
    assert [p.requires_grad for p in tiny_cnn.parameters()] == requires
    assert [(n, type(m)) for n, m in tiny_cnn.named_modules()] == structure
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_cnn.modules())
    assert qmodel is not tiny_cnn and not qmodel.training
    # Nothing is shared between the result and the input.
    ptrs = {p.data_ptr() for p in tiny_cnn.parameters()}
    assert not ptrs & {p.data_ptr() for p in qmodel.parameters()}


def test_prepare_model_structure(tiny_cnn: TinyCNN, calib_batches: list[torch.Tensor]) -> None:
    prepared = prepare_model(tiny_cnn, calib_batches[0], fast_config())
    assert [l.name for l in prepared.layers] == TINY_CNN_LAYERS
    assert list(prepared.plan) == TINY_CNN_LAYERS
    assert _bn_count(prepared.fp_model) == 0 and _bn_count(prepared.qmodel) == 0
    for name in TINY_CNN_LAYERS:
        q = prepared.qmodel.get_submodule(name)
        assert isinstance(q, QLinear if name == "fc" else QConv2d)
        assert (q.weight_bits, q.activation_bits) == prepared.plan[name]
        assert q.output_activation == prepared.fold.output_activations.get(name)
        assert (q.bn_target is None) == (name == "fc")
    assert prepared.qmodel.dw.groups == 16
    # With quantization disabled the wrapped model computes exactly what the folded FP model computes,
    # which is what the caller's model computes.
    x = calib_batches[1]
    from hf_adaquant.calibrate import quantization_disabled

    with torch.no_grad(), quantization_disabled(prepared.qmodel):
        out = prepared.qmodel(x)
    with torch.no_grad():
        assert (out - prepared.fp_model(x)).abs().max() <= 1e-6
        assert (out - tiny_cnn(x)).abs().max() <= 1e-5
    # Quantizers are not calibrated yet.
    with pytest.raises(RuntimeError, match="range"), torch.no_grad():
        prepared.qmodel(x)


def test_prepared_fp_reference_is_frozen(tiny_cnn: TinyCNN, calib_batches: list[torch.Tensor]) -> None:
    """prepare_model freezes the FP reference; that must include the biases folding creates (conv1 had none)."""
    prepared = prepare_model(tiny_cnn, calib_batches[0], fast_config())
    trainable = [n for n, p in prepared.fp_model.named_parameters() if p.requires_grad]
    assert trainable == []


# ------------------------------------------------------------------------------------- layer discovery


class ShuffledRegistration(nn.Module):
    """Modules registered in an order unrelated to the order they run in; one layer never runs, one twice."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.unused = nn.Conv2d(8, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.second = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.first = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.first(x))
        x = self.second(x)
        x = self.shared(self.shared(x))
        return self.head(x.mean(dim=(2, 3)))


def test_trace_layers_execution_order_and_skips(caplog: pytest.LogCaptureFixture) -> None:
    model = ShuffledRegistration().eval()
    with caplog.at_level(logging.WARNING, logger="hf_adaquant"):
        layers = trace_layers(model, torch.randn(2, 3, 8, 8))
    assert [l.name for l in layers] == ["first", "second", "head"]
    assert "shared" in caplog.text  # called twice: kept in float, with a warning
    by_name = {l.name: l for l in layers}
    assert by_name["first"].input_shape == (3, 8, 8) and by_name["first"].output_shape == (4, 8, 8)
    assert by_name["first"].macs == 4 * 8 * 8 * 3 * 3 * 3
    assert by_name["second"].macs == 8 * 8 * 8 * 3 * 3 * 1  # grouped: in_channels / groups per output
    assert by_name["head"].macs == 3 * 8 and by_name["head"].kind == "Linear"
    assert by_name["second"].num_params == 8 * 1 * 3 * 3


def test_trace_layers_errors() -> None:
    with pytest.raises(ValueError, match="calibration batch does not fit"):
        trace_layers(ShuffledRegistration(), torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="no quantizable layer"):
        trace_layers(nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1)), torch.randn(2, 3, 8, 8))


@pytest.fixture
def tiny_layers(tiny_cnn: TinyCNN, calib_batches: list[torch.Tensor]):
    return trace_layers(tiny_cnn, calib_batches[0])


def test_first_and_last_at_8_bits_by_default(tiny_layers) -> None:
    plan = plan_layer_bits(tiny_layers, 4, 4)
    assert plan == {"conv1": (8, 8), "conv2": (4, 4), "dw": (4, 4), "pw": (4, 4), "fc": (8, 8)}
    assert list(plan) == TINY_CNN_LAYERS
    # The floor never lowers a higher default, and weight-only quantization keeps activations float.
    assert plan_layer_bits(tiny_layers, 4, None)["fc"] == (8, None)
    assert plan_layer_bits(tiny_layers, 4, None)["dw"] == (4, None)
    assert plan_layer_bits(tiny_layers, 6, 6, first_last_bits=5)["conv1"] == (6, 6)


def test_first_last_exception_switchable(tiny_layers) -> None:
    plan = plan_layer_bits(tiny_layers, 4, 4, first_last_bits=None)
    assert set(plan.values()) == {(4, 4)} and len(plan) == 5


def test_include_exclude_patterns(tiny_layers) -> None:
    plan = plan_layer_bits(tiny_layers, 4, 4, include=["conv*", "dw"], exclude=["conv2"])
    assert list(plan) == ["conv1", "dw"]  # first/last are taken among the selected layers
    assert plan == {"conv1": (8, 8), "dw": (8, 8)}
    plan = plan_layer_bits(tiny_layers, 4, 4, exclude=["fc", "c*1"], first_last_bits=None)
    assert list(plan) == ["conv2", "dw", "pw"]
    with pytest.raises(ValueError, match="no quantizable layer left"):
        plan_layer_bits(tiny_layers, 4, 4, exclude=["*"])


def test_single_pattern_string_is_one_pattern(tiny_layers, tiny_cnn: TinyCNN,
                                              calib_batches: list[torch.Tensor]) -> None:
    """A string is one pattern, not a list of one-character patterns ("*" would select every layer)."""
    assert list(plan_layer_bits(tiny_layers, 4, 4, include="conv*")) == ["conv1", "conv2"]
    assert list(plan_layer_bits(tiny_layers, 4, 4, exclude="dw")) == ["conv1", "conv2", "pw", "fc"]
    qmodel = quantize(tiny_cnn, calib_batches, fast_config(pipeline="light", include="conv*", exclude="conv2"))
    assert isinstance(qmodel.conv1, QConv2d) and type(qmodel.conv2) is nn.Conv2d and type(qmodel.fc) is nn.Linear
    assert list(qmodel.hf_adaquant_report.plan) == ["conv1"]


def test_meta_model_is_refused_naming_its_tensors(calib_batches: list[torch.Tensor]) -> None:
    """A model without values (init_empty_weights / device_map="meta") fails up front, not deep in the cache."""
    with torch.device("meta"):
        model = TinyCNN()
    with pytest.raises(ValueError, match=r"'meta' device.*conv1\.weight, bn1\.weight.*\(\d+ in all\).*real weights"):
        quantize(model, calib_batches, fast_config(iterations=2))
    with pytest.raises(ValueError, match=r"'meta' device.*conv1\.weight"):
        prepare_model(model, calib_batches[0], fast_config())
    partly = TinyCNN()
    partly.fc.bias = nn.Parameter(torch.empty(10, device="meta"))  # one tensor left unloaded is enough
    with pytest.raises(ValueError, match=r"'meta' device, which hold no values: fc\.bias\. "):
        quantize(partly, calib_batches, fast_config(iterations=2))


def test_layer_bits_overrides(tiny_layers) -> None:
    plan = plan_layer_bits(tiny_layers, 4, 4, overrides={"dw": (2, 8), "conv1": (4, None)})
    assert plan["dw"] == (2, 8) and plan["conv1"] == (4, None)  # overrides win over the first/last floor
    assert plan["conv2"] == (4, 4) and plan["fc"] == (8, 8)
    with pytest.raises(ValueError, match="layer9"):
        plan_layer_bits(tiny_layers, 4, 4, overrides={"layer9": (4, 4)})
    with pytest.raises(ValueError, match="'pw'"):
        plan_layer_bits(tiny_layers, 4, 4, exclude=["pw"], overrides={"pw": (4, 4)})


def test_layer_bits_patterns(tiny_layers) -> None:
    # A pattern sets every matching layer; an exact name wins over a pattern whatever the key order.
    plan = plan_layer_bits(tiny_layers, 4, 4, overrides={"conv2": (3, 4), "conv*": (6, 6), "?w": (8, 8)})
    assert plan == {"conv1": (6, 6), "conv2": (3, 4), "dw": (8, 8), "pw": (8, 8), "fc": (8, 8)}
    with pytest.raises(ValueError, match=r"pattern 'block\*' matches no quantized layer"):
        plan_layer_bits(tiny_layers, 4, 4, overrides={"block*": (4, 4)})


def test_policy_reaches_the_quantized_model(tiny_cnn: TinyCNN, calib_batches: list[torch.Tensor]) -> None:
    config = fast_config(pipeline="light", exclude=["pw"], layer_bits={"dw": (3, 6)}, first_last_bits=None)
    qmodel = quantize(tiny_cnn, calib_batches, config)
    assert type(qmodel.pw) is nn.Conv2d  # excluded: left in float
    assert (qmodel.dw.weight_bits, qmodel.dw.activation_bits) == (3, 6)
    assert (qmodel.conv1.weight_bits, qmodel.conv1.activation_bits) == (4, 4)
    assert qmodel.hf_adaquant_report.plan == {"conv1": [4, 4], "conv2": [4, 4], "dw": [3, 6], "fc": [4, 4]}
    with pytest.raises(ValueError, match="nope"):
        quantize(tiny_cnn, calib_batches, fast_config(layer_bits={"nope": (4, 4)}))


def test_depthwise_conv_is_quantized(tiny_cnn: TinyCNN, calib_batches: list[torch.Tensor]) -> None:
    qmodel = quantize(tiny_cnn, calib_batches, fast_config(pipeline="light", bn_tuning=False,
                                                           bias_correction=False, weight_bits=3))
    dw = qmodel.dw
    assert isinstance(dw, QConv2d) and dw.groups == 16 and dw.weight.shape == (16, 1, 3, 3)
    assert dw.weight_quantizer.scale.shape == (16,)  # one step per depthwise channel
    wq = dw.quantized_weight().detach()
    codes = dw.weight_quantizer.int_codes(dw.weight)
    assert torch.allclose(wq, (codes - dw.weight_quantizer.zero_point.round()[:, None, None, None])
                          * dw.weight_quantizer.scale[:, None, None, None], atol=1e-6)
    assert all(torch.unique(codes[c]).numel() <= 8 for c in range(16))  # 3-bit grid per channel
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        expected = F.conv2d(dw.input_quantizer(x), wq, dw.bias, padding=1, groups=16)
        assert torch.allclose(dw(x), expected, atol=1e-5)


@pytest.mark.parametrize("module", [nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Linear(4, 2)])
def test_quantized_module_follows_the_float_layer_device(module: nn.Module) -> None:
    # GPU models: quantizer steps created on the CPU would meet CUDA weights in the first forward.
    from hf_adaquant.nn import quantize_module

    qlayer = quantize_module(module.to("meta"), 4, 8)
    devices = {t.device.type for t in list(qlayer.parameters()) + list(qlayer.buffers())}
    assert devices == {"meta"}
