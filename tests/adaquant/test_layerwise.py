"""AdaQuant proper: layer MSE goes down, sequential inputs come from the quantized prefix for every sample."""

from __future__ import annotations

import logging
import math
import tempfile

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import TINY_CNN_LAYERS, fast_config, make_batches, make_tiny_cnn
from torch import nn

from hf_adaquant import AdaQuantConfig, prepare_model
from hf_adaquant.adaquant import IOCache, capture_layer_io, layerwise, optim, optimize_layer, run_adaquant
from hf_adaquant.adaquant.cache import capture_layers_io
from hf_adaquant.nn import QConv2d
from hf_adaquant.utils.seeding import make_generator


def _cached(cache: IOCache) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*cache.iterate(10_000))
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------------------- layer MSE


def test_report_mse_after_never_above_before(quantized_tiny_cnn) -> None:
    _, qmodel, batches = quantized_tiny_cnn
    layers = qmodel.hf_adaquant_report.layers
    assert [l["name"] for l in layers] == TINY_CNN_LAYERS
    for l in layers:
        assert l["num_samples"] == sum(len(b) for b in batches)
        assert 0 < l["mse_after"] <= l["mse_before"], l
        assert (l["weight_bits"], l["activation_bits"]) == tuple(qmodel.hf_adaquant_report.plan[l["name"]])
    improved = [l for l in layers if l["mse_after"] < 0.98 * l["mse_before"]]
    assert len(improved) >= 0.6 * len(layers), layers


def _random_conv_cache(seed: int = 0, n_batches: int = 4):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 12, 3, padding=1).eval()
    fp = nn.Sequential(conv).eval()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.relu(torch.randn(16, 8, 12, 12, generator=g)) for _ in range(n_batches)]
    cache = capture_layer_io(fp, fp, "0", batches, dtype=torch.float32)
    return conv, cache, batches


def test_optimize_layer_lowers_mse_on_random_layer() -> None:
    conv, cache, batches = _random_conv_cache()
    fp_weight = conv.weight.detach().clone()
    layer = QConv2d.from_float(conv, 3, 4)
    # lr_weight 1e-3 of a weight step per Adam step, about the reference code's rate (1e-5 absolute).
    config = fast_config(weight_bits=3, activation_bits=4, iterations=50, batch_size=32, lr_weight=1e-3)
    report = optimize_layer(layer, cache, config, make_generator(0, 0), name="conv")
    assert report.num_samples == 64 and report.weight_bits == 3 and report.activation_bits == 4
    assert report.mse_after < 0.9 * report.mse_before
    # The reported numbers are the real layer error on the cached data.
    x, y = _cached(cache)
    with torch.no_grad():
        assert F.mse_loss(layer(x), y).item() == pytest.approx(report.mse_after, rel=1e-4)
        ref = QConv2d.from_float(conv, 3, 4)
        optimize_layer(ref, cache, config.replace(iterations=0), make_generator(0, 0))
        assert F.mse_loss(ref(x), y).item() == pytest.approx(report.mse_before, rel=1e-4)
    assert torch.equal(conv.weight, fp_weight)  # the float layer is untouched
    assert not torch.equal(layer.weight.detach(), fp_weight)  # W' was learned
    assert all(p.grad is None for p in layer.parameters())


@pytest.mark.parametrize("bits", [(4, 4), (4, 8)])
def test_optimize_layer_default_hyperparameters_lower_mse(bits: tuple[int, int]) -> None:
    """With the library's default hyper-parameters AdaQuant must lower the MSE of a plain random conv layer
    (64 cached samples of 8x12x12), not end worse than the range initialisation and silently fall back to it."""
    conv, cache, _ = _random_conv_cache(seed=0)
    layer = QConv2d.from_float(conv, *bits)
    config = AdaQuantConfig(weight_bits=bits[0], activation_bits=bits[1], progress=False)
    report = optimize_layer(layer, cache, config, make_generator(0, 0))
    assert report.mse_after < 0.95 * report.mse_before, report


def test_optimize_layer_applies_following_relu_to_the_loss() -> None:
    conv, cache, _ = _random_conv_cache(seed=3)
    layer = QConv2d.from_float(conv, 4, 8)
    layer.output_activation = "relu"
    report = optimize_layer(layer, cache, fast_config(iterations=0), make_generator(0, 0))
    x, y = _cached(cache)
    with torch.no_grad():
        out = layer(x)
        assert report.mse_before == pytest.approx(F.mse_loss(torch.relu(out), torch.relu(y)).item(), rel=1e-4)
        assert report.mse_before < F.mse_loss(out, y).item()


def test_optimize_layer_sets_and_learns_the_output_range() -> None:
    """An output quantizer (residual_output_bits) gets its range from the cached FP outputs by the activation range
    method, counts in the layer loss, and its step is learned with the input's."""
    conv, cache, _ = _random_conv_cache(seed=4)
    x, y = _cached(cache)
    layer = QConv2d.from_float(conv, 4, 8)
    layer.add_output_quantizer(8)
    config = fast_config(weight_bits=4, activation_bits=8, iterations=0, activation_range_method="minmax")
    report = optimize_layer(layer, cache, config, make_generator(0, 0))
    oq = layer.output_quantizer
    step, zero_point = float(oq.step().detach()), float(oq.zero_point.detach().round())
    assert (oq.qmin - zero_point) * step == pytest.approx(float(y.min()), abs=step)  # minmax: the whole range
    assert (oq.qmax - zero_point) * step == pytest.approx(float(y.max()), abs=step)
    with torch.no_grad():
        assert report.mse_before == pytest.approx(F.mse_loss(layer(x), y).item(), rel=1e-4)
        assert torch.equal(layer(x), oq(F.conv2d(layer.input_quantizer(x), layer.quantized_weight(), layer.bias,
                                                 padding=1)))
    assert any(p is oq.scale for g in optim.param_groups(layer, config, None) for p in g["params"])
    trained = QConv2d.from_float(conv, 4, 8)
    trained.add_output_quantizer(8)
    report = optimize_layer(trained, cache, config.replace(iterations=40, batch_size=32), make_generator(0, 0))
    assert report.mse_after < report.mse_before
    assert not torch.equal(trained.output_quantizer.scale, oq.scale)  # the step moved


def test_advanced_pipeline_with_residual_outputs_and_tuning() -> None:
    """Sequential AdaQuant, BN tuning and bias tuning with output quantizers on the residual convs: every layer's
    MSE no worse than its initialisation, the outputs on their grids, the model close to the float one."""
    from tests.conftest import RESIDUAL_CNN_RESIDUAL_LAYERS, make_residual_cnn

    from hf_adaquant import quantize

    batches = make_batches(2, 16)
    model = make_residual_cnn(0, batches)
    qmodel = quantize(model, batches, fast_config(weight_bits=4, activation_bits=8, residual_output_bits=8,
                                                  iterations=20, bias_tuning=True, bias_tuning_steps=5))
    report = qmodel.hf_adaquant_report
    assert report.bn_tuned_layers and report.bias_tuning_kl is not None
    for entry in report.layers:
        assert entry["mse_after"] <= entry["mse_before"], entry
    outputs = {}
    hooks = [qmodel.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out))
             for n in RESIDUAL_CNN_RESIDUAL_LAYERS]
    with torch.no_grad():
        logits, ref = qmodel(batches[0]), model(batches[0])
    for h in hooks:
        h.remove()
    for name in RESIDUAL_CNN_RESIDUAL_LAYERS:
        q = qmodel.get_submodule(name).output_quantizer
        torch.testing.assert_close(q(outputs[name]), outputs[name], rtol=0, atol=1e-6)
    assert (logits.argmax(1) == ref.argmax(1)).float().mean() >= 0.75
    assert F.mse_loss(logits, ref) < 0.1 * ref.var()


def test_optimize_layer_restores_initial_state_when_training_diverges() -> None:
    conv, cache, _ = _random_conv_cache(seed=1)
    layer = QConv2d.from_float(conv, 4, 4)
    bad = fast_config(iterations=20, lr_weight=1e4, lr_bias=1e3, lr_weight_scale=0.0, lr_act_scale=0.0,
                      lr_zero_point=0.0)
    report = optimize_layer(layer, cache, bad, make_generator(0, 0))
    assert report.mse_after == report.mse_before
    init = QConv2d.from_float(conv, 4, 4)
    optimize_layer(init, cache, bad.replace(iterations=0), make_generator(0, 0))
    for (k, a), (_, b) in zip(layer.state_dict().items(), init.state_dict().items()):
        assert torch.equal(a, b), k


def test_weight_deviation_limit_is_respected() -> None:
    conv, cache, _ = _random_conv_cache(seed=2)
    layer = QConv2d.from_float(conv, 4, 8)
    config = fast_config(iterations=40, batch_size=32, lr_weight=1e-2, weight_deviation_limit=0.02)
    report = optimize_layer(layer, cache, config, make_generator(0, 0))
    assert report.mse_after < report.mse_before
    step = layer.weight_quantizer.scale.detach()[:, None, None, None]
    dev = (layer.weight.detach() - conv.weight.detach()).abs()
    assert torch.all(dev <= 0.02 * step * (1 + 1e-4))
    assert torch.any(dev > 0.019 * step)  # the bound was reached, so it did bind


def test_run_adaquant_report_matches_layer_error() -> None:
    batches = make_batches(2, 16)
    model = make_tiny_cnn(0, batches)
    config = fast_config(iterations=20, cache_dtype="float32")
    prepared = prepare_model(model, batches[0], config)
    reports = run_adaquant(prepared.qmodel, prepared.fp_model, list(prepared.plan), batches, config)
    assert [r.name for r in reports] == TINY_CNN_LAYERS
    last = prepared.qmodel.fc
    cache = capture_layer_io(prepared.qmodel, prepared.fp_model, "fc", batches, dtype=torch.float32)
    x, y = _cached(cache)
    with torch.no_grad():
        assert F.mse_loss(last(x), y).item() == pytest.approx(reports[-1].mse_after, rel=1e-4)


# ------------------------------------------------------------------------------- sequential / parallel


@pytest.fixture
def prepared_with_first_layer():
    """TinyCNN prepared at W3A3 (no 8-bit floor), its first layer AdaQuant-ed, and 4 calibration batches."""
    batches = make_batches(4, 8)
    model = make_tiny_cnn(0, batches)
    config = fast_config(weight_bits=3, activation_bits=3, first_last_bits=None, iterations=10)
    prepared = prepare_model(model, batches[0], config)
    cache = capture_layer_io(prepared.qmodel, prepared.fp_model, "conv1", batches)
    optimize_layer(prepared.qmodel.conv1, cache, config, make_generator(0, 0))
    return prepared, batches, config


def test_sequential_capture_uses_quantized_inputs_for_every_sample(prepared_with_first_layer) -> None:
    prepared, batches, _ = prepared_with_first_layer
    qmodel, fp = prepared.qmodel, prepared.fp_model
    cache = capture_layer_io(qmodel, fp, "conv2", batches, dtype=torch.float32)
    x_cached, y_cached = _cached(cache)
    assert x_cached.shape == (32, 8, 32, 32) and y_cached.shape == (32, 16, 16, 16)
    start = 0
    for i, b in enumerate(batches):
        with torch.no_grad():
            q_in = torch.relu(qmodel.conv1(b))  # the quantized prefix, computed directly
            fp_in = torch.relu(fp.conv1(b))
            fp_out = fp.conv2(fp_in)
        rows = slice(start, start + len(b))
        start += len(b)
        assert torch.allclose(x_cached[rows], q_in, atol=1e-6), f"batch {i}: cached input is not the quantized one"
        for j in range(len(b)):  # every sample, not only the first batch
            assert (x_cached[rows][j] - fp_in[j]).abs().max() > 1e-3, (i, j)
        assert torch.allclose(y_cached[rows], fp_out, atol=1e-5), f"batch {i}: targets must stay FP"


def test_sequential_capture_with_fp16_cache(prepared_with_first_layer) -> None:
    prepared, batches, _ = prepared_with_first_layer
    cache = capture_layer_io(prepared.qmodel, prepared.fp_model, "conv2", batches)
    x_cached, _ = _cached(cache)
    with torch.no_grad():
        q_in = torch.cat([torch.relu(prepared.qmodel.conv1(b)) for b in batches])
    assert torch.allclose(x_cached, q_in.half().float())


def test_parallel_capture_uses_fp_inputs(prepared_with_first_layer) -> None:
    prepared, batches, _ = prepared_with_first_layer
    fp = prepared.fp_model
    cache = capture_layer_io(fp, fp, "conv2", batches, dtype=torch.float32)
    x_cached, y_cached = _cached(cache)
    with torch.no_grad():
        fp_in = torch.cat([torch.relu(fp.conv1(b)) for b in batches])
        assert torch.allclose(x_cached, fp_in, atol=1e-6)
        assert torch.allclose(y_cached, fp.conv2(fp_in), atol=1e-5)


@pytest.mark.parametrize("variant", ["sequential", "parallel"])
def test_run_adaquant_feeds_each_layer_the_right_inputs(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spy on the caches run_adaquant optimises each layer on: sequential inputs come from the quantized prefix
    as optimised so far (every sample of every batch), parallel inputs from the FP model; targets are FP."""
    batches = make_batches(3, 8)
    model = make_tiny_cnn(0, batches)
    config = fast_config(weight_bits=3, activation_bits=3, first_last_bits=None, iterations=10, variant=variant,
                         cache_dtype="float32")
    prepared = prepare_model(model, batches[0], config)
    qmodel, fp = prepared.qmodel, prepared.fp_model
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    real_optimize = layerwise.optimize_layer

    def spy(layer, cache, *args, **kwargs):
        name = kwargs.get("name", args[2] if len(args) > 2 else "")
        seen[name] = tuple(t.clone() for t in _cached(cache))
        return real_optimize(layer, cache, *args, **kwargs)

    monkeypatch.setattr(layerwise, "optimize_layer", spy)
    run_adaquant(qmodel, fp, list(prepared.plan), batches, config)
    assert list(seen) == TINY_CNN_LAYERS
    x_all = torch.cat(batches)
    with torch.no_grad():
        q_in = torch.relu(qmodel.conv1(x_all))  # conv1 is final once conv2 starts (sequential order)
        fp_in = torch.relu(fp.conv1(x_all))
        fp_out = fp.conv2(fp_in)
    x_cached, y_cached = seen["conv2"]
    assert torch.allclose(y_cached, fp_out, atol=1e-5)
    per_sample_gap = (x_cached - fp_in).flatten(1).abs().amax(1)
    if variant == "sequential":
        assert torch.allclose(x_cached, q_in, atol=1e-6)
        assert torch.all(per_sample_gap > 1e-3)  # all 24 samples, all 3 batches
    else:
        assert torch.allclose(x_cached, fp_in, atol=1e-6)
    # The first layer always sees the raw network input.
    assert torch.allclose(seen["conv1"][0], x_all)


# -------------------------------------------------------------------------------------------- cache


def test_cache_sample_keeps_inputs_and_targets_paired() -> None:
    conv, cache, _ = _random_conv_cache(seed=4)
    g = make_generator(0, 1)
    for _ in range(5):
        x, y = cache.sample(10, g)
        assert len(x) == len(y) == 10
        with torch.no_grad():
            assert torch.allclose(conv(x), y, atol=1e-5)


def test_cache_iterate_inputs_only_reads_the_same_inputs() -> None:
    _, cache, _ = _random_conv_cache(seed=5)
    both = list(cache.iterate(7, limit=30))
    inputs_only = list(cache.iterate(7, limit=30, targets=False))
    assert [len(x) for x, _ in both] == [7, 7, 7, 7, 2]
    assert all(y is None for _, y in inputs_only)
    assert torch.equal(torch.cat([x for x, _ in both]), torch.cat([x for x, _ in inputs_only]))


def test_range_initialisation_reads_large_batches_in_slices_with_the_same_result(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Range initialisation reads each mini-batch of 256 samples in slices of bounded size (a resnet50 layer1
    input would be 822 MB at once): the slices hold at most the limit, and the ranges are bit for bit those of
    reading the batch whole."""
    from hf_adaquant.adaquant import ranges

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.relu(torch.randn(100, 8, 12, 12, generator=g)) for _ in range(3)]  # 300 samples: 256 + 44
    cache = capture_layer_io(nn.Sequential(conv), nn.Sequential(conv), "0", batches, dtype=torch.float16)

    def ranges_with(part_elements: int) -> tuple[list[int], list[torch.Tensor]]:
        monkeypatch.setattr(ranges, "RANGE_PART_ELEMENTS", part_elements)
        sizes: list[int] = []
        read = cache._read

        def spy(chunks, pieces, n):
            out = read(chunks, pieces, n)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(cache, "_read", spy)
        layer = QConv2d.from_float(conv, 4, 4)
        layer.add_output_quantizer(4)
        ranges.init_input_range(layer, cache, "mse", seed=0)
        ranges.init_output_range(layer, cache, "mse", seed=0)
        monkeypatch.setattr(cache, "_read", read)
        return sizes, [v.clone() for k, v in layer.state_dict().items() if "put_quantizer" in k]

    whole_sizes, whole = ranges_with(1 << 30)
    sliced_sizes, sliced = ranges_with(10_000)
    per_input, per_output = 8 * 12 * 12, 12 * 12 * 12
    assert whole_sizes == [256 * per_input, 44 * per_input, 256 * per_output, 44 * per_output]
    assert max(sliced_sizes) <= 10_000 and len(sliced_sizes) > 20
    assert len(whole) >= 4 and all(torch.equal(a, b) for a, b in zip(whole, sliced))


def test_cache_spilled_to_disk_equals_in_memory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_cache_bytes bounds memory by spilling to disk; the cached data must be the same.

    The inputs (8x32x32) and outputs (16x16x16) of conv2 differ in size, so with a budget between the two the
    input store spills at a different chunk than the target store.
    """
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # spill files go to pytest's tmp dir
    batches = make_batches(4, 16)
    model = make_tiny_cnn(0, batches)
    in_memory = capture_layer_io(model, model, "conv2", batches)
    x_ref, y_ref = _cached(in_memory)
    for max_bytes in (0, 2 * 300_000):
        spilled = capture_layer_io(model, model, "conv2", batches, max_bytes=max_bytes)
        try:
            assert spilled.x.spill_dir is not None
            x, y = _cached(spilled)
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
            xs, ys = spilled.sample(8, make_generator(0, 2))
            with torch.no_grad():
                assert torch.allclose(model.conv2(xs), ys, atol=2e-2)
        finally:
            spilled.cleanup()
        assert spilled.x.spill_dir is None


def test_capture_raises_when_layer_does_not_run() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    model = Net()
    with pytest.raises(RuntimeError, match="did not run"):
        capture_layer_io(model, model, "unused", [torch.randn(2, 3, 4, 4)])


def test_weight_learning_rates_are_per_channel_steps() -> None:
    """W' and the weight steps move in units of each channel's own step (folded BNs leave steps far apart)."""
    from hf_adaquant.nn import quantize_module

    layer = quantize_module(nn.Linear(4, 2), 4, None)
    with torch.no_grad():
        layer.weight_quantizer.scale.copy_(torch.tensor([1e-3, 1e-1]))
    groups = optim.param_groups(layer, fast_config(lr_weight=1e-2, lr_weight_scale=1e-2), None)
    optimizer = torch.optim.Adam(groups)
    per_channel = optim.PerChannelSteps(layer)
    w0, s0 = layer.weight.detach().clone(), layer.weight_quantizer.scale.detach().clone()
    layer.weight.grad = torch.ones_like(layer.weight)
    layer.weight_quantizer.scale.grad = torch.ones_like(s0)
    layer.bias.grad = torch.zeros_like(layer.bias)
    per_channel.before_step()
    optimizer.step()
    per_channel.after_step()
    moved = (w0 - layer.weight.detach()).abs()
    # Adam's first step moves every element by lr: here 1e-2 of its channel's step, whatever that step is.
    torch.testing.assert_close(moved, 1e-2 * s0[:, None].expand_as(moved), rtol=1e-2, atol=0)  # float32 of W
    torch.testing.assert_close(s0 - layer.weight_quantizer.scale.detach(), 1e-2 * s0, rtol=1e-4, atol=0)


# ------------------------------------------------------------------------- values the fp16 cache cannot hold


def _huge_activation_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()


@pytest.mark.parametrize("variant", ["sequential", "parallel"])
def test_activations_beyond_fp16_give_a_finite_accurate_model(variant: str, caplog) -> None:
    """Inputs of ~1e5 overflow fp16 (max 65504): the default fp16 cache used to store inf, giving inf input steps
    and an all-NaN model. The stream is now kept in float32 and the model matches the FP one."""
    from hf_adaquant import quantize

    model = _huge_activation_net()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1e5
    config = fast_config(weight_bits=8, activation_bits=8, iterations=5, batch_size=4, bias_tuning_steps=2,
                         first_last_bits=None, variant=variant)
    assert config.cache_dtype == "float16"
    with caplog.at_level(logging.INFO, logger="hf_adaquant.adaquant.cache"):
        qmodel = quantize(model, [x], config)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() < 0.05
    for report in qmodel.hf_adaquant_report.layers:
        assert math.isfinite(report["mse_before"]) and report["mse_after"] <= report["mse_before"]
    assert "layer '0'" in caplog.text and "float32" in caplog.text


def test_cache_widens_to_float32_only_for_the_overflowing_stream() -> None:
    model = _huge_activation_net()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1e5
    small = capture_layer_io(model, model, "0", [x / 1e3])
    big = capture_layer_io(model, model, "0", [x / 1e3, x])
    try:
        assert small.x.chunks[0].dtype == torch.float16 and small.y.chunks[0].dtype == torch.float16
        assert big.x.dtype == torch.float32 and big.x.chunks[1].dtype == torch.float32
        assert big.x.chunks[0].dtype == torch.float16  # the first batch fitted fp16 and stays so
        x_cached, _ = _cached(big)
        assert torch.isfinite(x_cached).all() and torch.equal(x_cached[4:], x)
    finally:
        small.cleanup()
        big.cleanup()


def test_non_finite_activation_is_refused_naming_layer_and_batch() -> None:
    class Overflowing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).mean(dim=(2, 3)) * 1e38)  # inf in float32 for large inputs

    model = Overflowing().eval()
    batches = [torch.randn(2, 3, 4, 4) * 1e-3, torch.randn(2, 3, 4, 4) * 1e3]
    for capture in (lambda: capture_layer_io(model, model, "fc", batches),
                    lambda: capture_layers_io(model, ["conv", "fc"], batches)):
        with pytest.raises(ValueError, match=r"inputs of layer 'fc' contain NaN or inf.*calibration batch 1"):
            capture()


def test_non_finite_weights_give_an_error_naming_the_layer() -> None:
    from hf_adaquant.nn import quantize_module

    layer = quantize_module(nn.Linear(4, 2), 4, 8)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    fp = nn.Sequential(nn.Linear(4, 2)).eval()
    cache = capture_layer_io(fp, fp, "0", [torch.randn(8, 4)])
    with pytest.raises(ValueError, match=r"weight range of layer 'head'.*non-finite"):
        optimize_layer(layer, cache, fast_config(iterations=2), make_generator(0, 0), name="head")


def test_non_finite_loss_never_beats_a_finite_one() -> None:
    assert optim.improves(1.0, float("nan")) and optim.improves(1.0, float("inf"))
    assert not optim.improves(float("nan"), 1.0) and not optim.improves(float("inf"), 1.0)
    assert not optim.improves(float("nan"), float("nan"))
    assert optim.improves(0.5, 1.0) and not optim.improves(1.0, 0.5)


def test_optimize_layer_keeps_the_initialisation_when_training_turns_nan(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN checkpoint loss must not replace the range initialisation (``nan < best`` is False, but a NaN
    *initial* loss used to make every later comparison False as well)."""
    conv, cache, _ = _random_conv_cache(seed=7)
    from hf_adaquant.nn import quantize_module

    layer = quantize_module(conv, 4, 8)
    losses = iter([float("nan"), 2.0, float("nan"), 1.0, float("inf"), float("nan")])
    monkeypatch.setattr(layerwise, "evaluate_layer", lambda *args, **kwargs: next(losses))
    report = optimize_layer(layer, cache, fast_config(iterations=5), make_generator(0, 0), name="conv")
    assert report.mse_after == 1.0
