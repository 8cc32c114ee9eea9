"""Post-quantization tuning: BN re-estimation, bias correction, bias tuning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import TINY_CNN_LAYERS, fast_config, make_batches, make_tiny_cnn
from torch import nn

from hf_adaquant import prepare_model, quantize
from hf_adaquant.calibrate import qmodules
from hf_adaquant.tuning import activation_elements_per_sample, correct_bias, tune_batchnorm, tune_bias

BN_CONVS = ["conv1", "conv2", "dw", "pw"]


@torch.no_grad()
def _layer_outputs(model: nn.Module, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs of the named layers over all batches (full forward passes of ``model``)."""
    outs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: outs[n].append(o.detach()))
               for n in names]
    try:
        for b in batches:
            model(b)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in outs.items()}


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1).mean(1) if t.dim() == 4 else t.mean(0)


def _channel_std(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(t.shape[1], -1).std(1)


@pytest.fixture
def low_bit_naive(tiny_cnn, calib_batches):
    """W2A4 (no 8-bit floor) min-max quantization without any tuning: large statistics shifts to repair."""
    config = fast_config(weight_bits=2, activation_bits=4, first_last_bits=None, pipeline="light", bn_tuning=False,
                         bias_correction=False, weight_range_method="minmax", activation_range_method="minmax")
    qmodel = quantize(tiny_cnn, calib_batches, config)
    fp = prepare_model(tiny_cnn, calib_batches[0], config).fp_model
    return qmodel, fp, config


# --------------------------------------------------------------------------------------------- BN tuning


def test_bn_tuning_restores_output_statistics(low_bit_naive, calib_batches) -> None:
    qmodel, fp, _ = low_bit_naive
    fp_out = _layer_outputs(fp, BN_CONVS, calib_batches)
    # The folded BN's beta is the FP layer's output mean on this data (BN stats were fitted to it): a real target.
    assert torch.allclose(_channel_mean(fp_out["conv1"]), qmodel.conv1.bn_target[1], atol=1e-4)
    before = _layer_outputs(qmodel, BN_CONVS, calib_batches)
    codes_before = {n: qmodel.get_submodule(n).weight_quantizer.int_codes(qmodel.get_submodule(n).weight)
                    for n in TINY_CNN_LAYERS}
    fc_before = {k: v.clone() for k, v in qmodel.fc.state_dict().items()}

    tuned = tune_batchnorm(qmodel, calib_batches)

    assert tuned == BN_CONVS  # every conv that had a BN folded into it, and only those
    after = _layer_outputs(qmodel, BN_CONVS, calib_batches)
    for name in BN_CONVS:
        std_t, beta = qmodel.get_submodule(name).bn_target
        err_before = (_channel_mean(before[name]) - beta).abs().mean()
        err_after = (_channel_mean(after[name]) - beta).abs().mean()
        assert err_after < err_before, name
        # Weight integer codes are untouched: only steps and bias change.
        layer = qmodel.get_submodule(name)
        assert torch.equal(layer.weight_quantizer.int_codes(layer.weight), codes_before[name]), name
        assert layer.bn is None
    # The first layer sees the same input before and after, so its statistics are restored exactly.
    std_t, beta = qmodel.conv1.bn_target
    assert torch.allclose(_channel_mean(after["conv1"]), beta, atol=1e-4)
    assert torch.allclose(_channel_std(after["conv1"]), std_t, rtol=1e-2)
    assert (_channel_std(before["conv1"]) / std_t - 1).abs().max() > 0.05  # there was something to restore
    # Layers without a folded BN are left alone.
    for k, v in qmodel.fc.state_dict().items():
        assert torch.equal(v, fc_before[k]), k
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())


def test_bn_tuning_keeps_quantized_weights_on_the_rescaled_grid(low_bit_naive, calib_batches) -> None:
    qmodel, _, _ = low_bit_naive
    old = {n: (qmodel.get_submodule(n).quantized_weight().detach().clone(),
               qmodel.get_submodule(n).weight_quantizer.scale.detach().clone()) for n in BN_CONVS}
    tune_batchnorm(qmodel, calib_batches)
    for n in BN_CONVS:
        layer = qmodel.get_submodule(n)
        wq_old, s_old = old[n]
        factor = (layer.weight_quantizer.scale.detach() / s_old)[:, None, None, None]
        assert torch.all(factor > 0)
        # Folding BN only rescales each output channel of the quantized weight.
        assert torch.allclose(layer.quantized_weight().detach(), wq_old * factor, atol=1e-6)
        assert torch.allclose(layer.weight.detach(), layer.quantized_weight().detach(), atol=1e-6)


def test_bn_tuning_keeps_a_near_lossless_model_close_to_fp(calib_batches) -> None:
    """BN tuning is meant to restore the FP layer statistics. When the folded BN's running statistics do not
    describe the calibration data (here: BN fitted on shifted/rescaled data, as after training-time
    augmentation), forcing every channel to (|gamma|, beta) moves the model away from the FP model it copies.
    At W8A8 the model is nearly lossless before BN tuning and must stay so after it."""
    train = [b * 1.5 + 0.3 for b in make_batches(seed=9)]
    model = make_tiny_cnn(0, train)
    config = fast_config(weight_bits=8, activation_bits=8, pipeline="light", bn_tuning=False,
                         bias_correction=False)
    qmodel = quantize(model, calib_batches, config)
    x = torch.cat(calib_batches)

    def rel_err() -> float:
        with torch.no_grad():
            ref = model(x)
            return ((qmodel(x) - ref).norm() / ref.norm()).item()

    before = rel_err()
    assert before < 0.02
    fp_model = prepare_model(model, calib_batches[0], config).fp_model
    tune_batchnorm(qmodel, calib_batches, fp_model=fp_model)
    assert rel_err() < max(2 * before, 0.02)


def test_bn_tuning_without_folded_bn_is_a_noop(calib_batches) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    model(calib_batches[0])
    qmodel = quantize(model, calib_batches, fast_config(pipeline="light", bn_tuning=False, bias_correction=False))
    state = copy.deepcopy(qmodel.state_dict())
    assert tune_batchnorm(qmodel, calib_batches) == []
    for k, v in qmodel.state_dict().items():
        assert torch.equal(v, state[k])


# ------------------------------------------------------------------------------------------ bias correction


def _channel_errors(qmodel, fp, names, batches) -> dict[str, torch.Tensor]:
    """Mean error per output channel of each layer, each model run end to end on its own inputs."""
    q_out, fp_out = _layer_outputs(qmodel, names, batches), _layer_outputs(fp, names, batches)
    return {n: _channel_mean(fp_out[n] - q_out[n]) for n in names}


@pytest.mark.parametrize("method", ["per_layer", "single_pass"])
def test_bias_correction_reduces_mean_channel_error(low_bit_naive, calib_batches, method) -> None:
    qmodel, fp, _ = low_bit_naive
    before = _channel_errors(qmodel, fp, TINY_CNN_LAYERS, calib_batches)
    weights_before = {n: qmodel.get_submodule(n).weight.detach().clone() for n in TINY_CNN_LAYERS}
    shifts = correct_bias(qmodel, fp, TINY_CNN_LAYERS, calib_batches, method=method)
    after = _channel_errors(qmodel, fp, TINY_CNN_LAYERS, calib_batches)
    assert list(shifts) == TINY_CNN_LAYERS and all(v > 0 for v in shifts.values())
    for n in TINY_CNN_LAYERS:
        assert after[n].abs().mean() < 0.5 * before[n].abs().mean(), n
        if method == "per_layer":
            # Every layer is corrected given the corrected prefix, so its mean error vanishes (fp32 cache).
            assert after[n].abs().max() < 1e-4, n
        assert torch.equal(qmodel.get_submodule(n).weight.detach(), weights_before[n])
    # The first layer's shift is exactly its mean error before correction (no prefix to wait for).
    assert shifts["conv1"] == pytest.approx(before["conv1"].abs().mean().item(), rel=1e-3)


def test_single_pass_bias_correction_is_exact_on_one_batch(low_bit_naive, calib_batches) -> None:
    """With one batch, correcting inside the forward sees exactly the corrected prefix: same as per layer."""
    qmodel, fp, _ = low_bit_naive
    one_batch = [torch.cat(calib_batches)]
    per_layer, single = copy.deepcopy(qmodel), copy.deepcopy(qmodel)
    correct_bias(per_layer, fp, TINY_CNN_LAYERS, one_batch, method="per_layer")
    correct_bias(single, fp, TINY_CNN_LAYERS, one_batch, method="single_pass")
    for n in TINY_CNN_LAYERS:
        a, b = per_layer.get_submodule(n).bias, single.get_submodule(n).bias
        assert not torch.equal(a, qmodel.get_submodule(n).bias), n
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), n


def test_single_pass_bias_correction_close_to_per_layer(low_bit_naive, calib_batches) -> None:
    """Over several batches the running average leaves a small residual: far below the uncorrected error."""
    qmodel, fp, _ = low_bit_naive
    before = _channel_errors(qmodel, fp, TINY_CNN_LAYERS, calib_batches)
    correct_bias(qmodel, fp, TINY_CNN_LAYERS, calib_batches, method="single_pass")
    after = _channel_errors(qmodel, fp, TINY_CNN_LAYERS, calib_batches)
    for n in TINY_CNN_LAYERS:
        assert after[n].abs().mean() < 0.1 * before[n].abs().mean(), n


def test_bias_correction_method_is_checked(low_bit_naive, calib_batches) -> None:
    qmodel, fp, _ = low_bit_naive
    with pytest.raises(ValueError, match="single_pass"):
        correct_bias(qmodel, fp, TINY_CNN_LAYERS, calib_batches, method="exact")
    with pytest.raises(ValueError, match="bias_correction_method"):
        fast_config(bias_correction_method="exact")


def test_light_pipeline_output_closer_than_naive(tiny_cnn, calib_batches) -> None:
    base = dict(weight_bits=3, activation_bits=4, first_last_bits=None, pipeline="light",
                weight_range_method="minmax", activation_range_method="minmax")
    naive = quantize(tiny_cnn, calib_batches, fast_config(bn_tuning=False, bias_correction=False, **base))
    light = quantize(tiny_cnn, calib_batches, fast_config(**base))
    x = torch.cat(calib_batches)
    with torch.no_grad():
        ref = tiny_cnn(x)
        err_naive = (naive(x) - ref).pow(2).mean()
        err_light = (light(x) - ref).pow(2).mean()
        bias_naive = (naive(x) - ref).mean(0).abs().mean()
        bias_light = (light(x) - ref).mean(0).abs().mean()
    assert bias_light < 0.1 * bias_naive
    assert err_light < err_naive


def test_tuning_with_residual_output_quantizers(calib_batches) -> None:
    """BN tuning and bias correction on a model whose residual convs quantize their outputs: the residual layers
    are tuned too, and the light pipeline still ends closer to the float model than without tuning."""
    from tests.conftest import RESIDUAL_CNN_RESIDUAL_LAYERS, make_residual_cnn

    model = make_residual_cnn(0, calib_batches)
    base = dict(weight_bits=3, activation_bits=4, first_last_bits=None, pipeline="light", residual_output_bits=8,
                weight_range_method="minmax", activation_range_method="minmax")
    naive = quantize(model, calib_batches, fast_config(bn_tuning=False, bias_correction=False, **base))
    light = quantize(model, calib_batches, fast_config(**base))
    assert set(RESIDUAL_CNN_RESIDUAL_LAYERS) <= set(light.hf_adaquant_report.bn_tuned_layers)
    x = torch.cat(calib_batches)
    with torch.no_grad():
        ref = model(x)
        err_naive, err_light = (naive(x) - ref).pow(2).mean(), (light(x) - ref).pow(2).mean()
        bias_naive, bias_light = (naive(x) - ref).mean(0).abs().mean(), (light(x) - ref).mean(0).abs().mean()
    assert bias_light < 0.5 * bias_naive and err_light < err_naive


# -------------------------------------------------------------------------------------------- bias tuning


def _kl_fp_to_q(fp_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    p = F.softmax(fp_logits.double(), -1)
    return (p * (F.log_softmax(fp_logits.double(), -1) - F.log_softmax(q_logits.double(), -1))).sum(-1).mean().item()


def test_bias_tuning_kl_reported_and_real(quantized_tiny_cnn) -> None:
    model, qmodel, batches = quantized_tiny_cnn
    report = qmodel.hf_adaquant_report
    assert report.bias_tuning_kl is not None
    kl_before, kl_after = report.bias_tuning_kl
    assert 0 <= kl_after <= kl_before
    with torch.no_grad():
        kl_now = sum(_kl_fp_to_q(model(b), qmodel(b)) for b in batches) / len(batches)
    assert kl_now == pytest.approx(kl_after, rel=1e-3, abs=1e-7)


def test_tune_bias_changes_only_biases_and_lowers_kl(low_bit_naive, calib_batches) -> None:
    qmodel, fp, _ = low_bit_naive
    params_before = {n: p.detach().clone() for n, p in qmodel.named_parameters()}
    requires = {n: p.requires_grad for n, p in qmodel.named_parameters()}
    with torch.no_grad():
        kl_direct = sum(_kl_fp_to_q(fp(b), qmodel(b)) for b in calib_batches) / len(calib_batches)
    before, after = tune_bias(qmodel, fp, calib_batches, steps=40, lr=1e-2, seed=0)
    assert before == pytest.approx(kl_direct, rel=1e-3)
    assert after < before
    with torch.no_grad():
        assert sum(_kl_fp_to_q(fp(b), qmodel(b)) for b in calib_batches) / len(calib_batches) == pytest.approx(
            after, rel=1e-3)
    bias_names = {f"{n}.bias" for n in qmodules(qmodel)}
    changed = {n for n, p in qmodel.named_parameters() if not torch.equal(p.detach(), params_before[n])}
    assert changed and changed <= bias_names
    assert {n: p.requires_grad for n, p in qmodel.named_parameters()} == requires
    assert all(p.grad is None for p in qmodel.parameters())


def test_tune_bias_slices_give_the_same_gradient(low_bit_naive, calib_batches) -> None:
    """Accumulating over slices of 3 samples (bounded memory) trains the same biases as whole batches of 16."""
    qmodel, fp, _ = low_bit_naive
    whole, sliced = copy.deepcopy(qmodel), copy.deepcopy(qmodel)
    kl_whole = tune_bias(whole, fp, calib_batches, steps=8, lr=1e-2, seed=0)
    kl_sliced = tune_bias(sliced, fp, calib_batches, steps=8, lr=1e-2, seed=0, max_backprop_samples=3)
    assert kl_sliced == pytest.approx(kl_whole, rel=1e-4)
    for name in qmodules(qmodel):
        start = qmodel.get_submodule(name).bias
        moved_whole = whole.get_submodule(name).bias - start
        moved_sliced = sliced.get_submodule(name).bias - start
        assert moved_whole.abs().max() > 1e-3, name
        assert torch.allclose(moved_sliced, moved_whole, atol=1e-5), name


def test_activation_elements_per_sample_counts_layer_outputs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    batch = torch.randn(6, 3, 8, 8)
    # conv 4x8x8, relu 4x8x8, flatten 256, linear 5 values per sample
    assert activation_elements_per_sample(model, batch) == 256 * 3 + 5


def test_tune_bias_keeps_biases_when_it_cannot_improve(low_bit_naive, calib_batches) -> None:
    qmodel, fp, _ = low_bit_naive
    state = copy.deepcopy(qmodel.state_dict())
    before, after = tune_bias(qmodel, fp, calib_batches, steps=5, lr=50.0, seed=0)  # absurd lr: KL blows up
    assert after == before
    for k, v in qmodel.state_dict().items():
        assert torch.equal(v, state[k]), k
