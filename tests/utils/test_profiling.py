"""RunProfile: phases, FLOP formulas against torch's FLOP counter, bounds from a throughput, the current profile."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from hf_adaquant import AdaQuantConfig
from hf_adaquant.adaquant.cache import IOCache
from hf_adaquant.adaquant.layerwise import optimize_layer
from hf_adaquant.nn import quantize_module
from hf_adaquant.utils.profiling import (RunProfile, Throughput, add_flops, conv2d_flops, count_flops,
                                         current_profile, layer_flops, linear_flops, measure_throughput, phase,
                                         profiling)
from hf_adaquant.utils.seeding import make_generator

TP = Throughput(gemm=2e9, conv=5e8)


def test_phases_accumulate_time_calls_and_flops() -> None:
    prof = RunProfile(TP)
    for _ in range(2):
        with prof.phase("capture", flops=1e9, kind="conv"):
            time.sleep(0.01)
    with prof.phase("evaluation"):
        pass
    prof.add_flops("capture", 2e9, "gemm")
    rec = prof.phases["capture"]
    assert rec.calls == 2 and rec.seconds >= 0.02
    assert rec.flops == {"conv": 2e9, "gemm": 2e9}
    assert [r["phase"] for r in prof.table()] == ["capture", "evaluation"]  # first-seen order


def test_bound_is_flops_over_throughput_per_kind() -> None:
    prof = RunProfile(TP)
    prof.add_seconds("optimisation", 12.0, calls=3)
    prof.add_flops("optimisation", 4e9, "gemm")  # 2 s at 2 GFLOP/s
    prof.add_flops("optimisation", 2e9, "conv")  # 4 s at 0.5 GFLOP/s
    prof.add_seconds("range_init", 1.0)
    rows = {r["phase"]: r for r in prof.table()}
    assert rows["optimisation"]["bound_s"] == pytest.approx(6.0)
    assert rows["optimisation"]["ratio"] == pytest.approx(2.0)
    assert rows["optimisation"]["gflop"] == pytest.approx(6.0)
    assert rows["optimisation"]["calls"] == 3
    assert rows["range_init"]["bound_s"] == 0.0 and rows["range_init"]["ratio"] is None  # no FLOPs: no bound
    text = prof.format_table()
    assert "optimisation" in text and "2.00" in text and "2.0 GFLOP/s GEMM" in text
    assert prof.to_dict()["throughput"]["conv_gflops"] == pytest.approx(0.5)


def test_bad_kind_and_empty_name_are_refused() -> None:
    prof = RunProfile(TP)
    with pytest.raises(ValueError, match="unknown FLOP kind 'tflops'"):
        prof.add_flops("x", 1.0, "tflops")
    with pytest.raises(ValueError, match="non-empty name"):
        prof.add_seconds("", 1.0)
    with pytest.raises(TypeError, match="LayerNorm"):
        layer_flops(nn.LayerNorm(4), (2, 4))


def test_merge_adds_phases() -> None:
    a, b = RunProfile(TP), RunProfile(TP)
    a.add_seconds("capture", 1.0)
    b.add_seconds("capture", 2.0, calls=2)
    b.add_flops("capture", 3e9)
    a.merge(b)
    assert a.phases["capture"].seconds == 3.0 and a.phases["capture"].calls == 3
    assert a.phases["capture"].flops == {"gemm": 3e9}


def test_linear_flops_match_the_formula_and_torch_counter() -> None:
    layer = nn.Linear(24, 40)
    x = torch.randn(3, 7, 24, requires_grad=True)
    assert linear_flops(24, 40, 21) == 2 * 21 * 24 * 40
    assert layer_flops(layer, x.shape) == ("gemm", 2 * 21 * 24 * 40)
    assert count_flops(lambda: layer(x)) == 2 * 21 * 24 * 40
    # backward: one product for the input gradient, one for the weight gradient
    full = layer_flops(layer, x.shape, grad_input=True, grad_weight=True)[1]
    assert full == 3 * 2 * 21 * 24 * 40
    assert count_flops(lambda: layer(x).sum().backward()) == full
    x_data = x.detach()  # no input gradient: forward + weight gradient only
    assert count_flops(lambda: layer(x_data).sum().backward()) == layer_flops(layer, x.shape, grad_weight=True)[1]


@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, padding=1), dict(groups=4, dilation=2),
                                    dict(padding="same"), dict(kernel_size=(1, 3), stride=(2, 1))])
def test_conv_flops_match_the_formula_and_torch_counter(kwargs: dict) -> None:
    kernel = kwargs.pop("kernel_size", 3)
    conv = nn.Conv2d(8, 12, kernel, **kwargs)
    x = torch.randn(2, 8, 11, 9, requires_grad=True)
    out = conv(x)
    cin_per_group = 8 // conv.groups
    expected = 2 * out.numel() * cin_per_group * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv2d_flops(conv, x.shape) == expected
    assert count_flops(lambda: conv(x)) == expected
    full = layer_flops(conv, x.shape, grad_input=True, grad_weight=True)[1]
    assert full == 3 * expected
    if conv.groups == 1:  # torch's counter does not divide grouped backward convolutions by the groups
        assert count_flops(lambda: conv(x).sum().backward()) == full
    with pytest.raises(ValueError, match="8 input channels"):
        conv2d_flops(conv, (2, 3, 11, 9))


def test_current_profile_is_scoped_and_phase_is_a_no_op_without_one() -> None:
    assert current_profile() is None
    with phase("capture", flops=1e9):  # nothing recorded, nothing raised
        pass
    add_flops("capture", 1e9)
    outer = RunProfile(TP)
    with profiling(outer) as prof:
        assert prof is outer and current_profile() is outer
        with profiling() as inner:
            with phase("capture", flops=5.0, kind="conv"):
                pass
        assert current_profile() is outer
        add_flops("evaluation", 7.0)
    assert current_profile() is None
    assert inner.phases["capture"].flops == {"conv": 5.0} and inner.phases["capture"].calls == 1
    assert "capture" not in outer.phases and outer.phases["evaluation"].flops == {"gemm": 7.0}


def test_measured_throughput_is_positive_and_cached() -> None:
    tp = measure_throughput(seconds=0.2, refresh=True)
    assert tp.gemm > 1e8 and tp.conv > 1e8  # any machine this runs on does more than 0.1 GFLOP/s
    assert tp.threads == torch.get_num_threads()
    assert measure_throughput() is tp
    prof = RunProfile()  # measures lazily (cached here)
    prof.add_flops("x", tp.gemm)  # one second of GEMM work
    assert prof.bound("x") == pytest.approx(1.0)


def _conv_cache(samples: int = 40) -> tuple[nn.Module, IOCache]:
    torch.manual_seed(0)
    fp = nn.Conv2d(4, 6, 3, padding=1)
    cache = IOCache(torch.float32, name="conv")
    with torch.no_grad():
        for start in range(0, samples, 10):
            x = torch.randn(10, 4, 8, 8)
            cache.x.append(x)
            cache.y.append(fp(x))
    cache.finalize()
    return quantize_module(fp, 4, 8), cache


def test_optimize_layer_reports_its_phases_and_step_flops() -> None:
    layer, cache = _conv_cache()
    config = AdaQuantConfig(iterations=10, batch_size=16, seed=0)
    prof = RunProfile(TP)
    report = optimize_layer(layer, cache, config, make_generator(0, 1), name="conv", profile=prof)
    phases = prof.phases
    assert {"range_init", "evaluation", "optimisation", "optimisation/sample"} <= set(phases)
    assert phases["optimisation"].calls == 10
    # each step: forward + input gradient (the input step learns) + weight gradient, on 16 samples
    per_step = conv2d_flops(layer, (16, 4, 8, 8))
    assert phases["optimisation"].flops == {"conv": 10 * 3 * per_step}
    # evaluations: before, and at the 5 checkpoints, each a forward over the 40 cached samples
    assert phases["evaluation"].calls == 6
    assert phases["evaluation"].flops == {"conv": 6 * conv2d_flops(layer, (40, 4, 8, 8))}
    assert phases["optimisation/sample"].seconds <= phases["optimisation"].seconds
    assert report.mse_after <= report.mse_before


def test_optimize_layer_uses_the_current_profile_and_matches_an_unprofiled_run() -> None:
    config = AdaQuantConfig(iterations=6, batch_size=16, seed=0)
    layer_a, cache = _conv_cache()
    plain = optimize_layer(layer_a, cache, config, make_generator(0, 1), name="conv")
    layer_b, cache_b = _conv_cache()
    with profiling(RunProfile(TP)) as prof:
        profiled = optimize_layer(layer_b, cache_b, config, make_generator(0, 1), name="conv")
    assert prof.phases["optimisation"].calls == 6
    assert (plain.mse_before, plain.mse_after) == (profiled.mse_before, profiled.mse_after)
    for (k, a), b in zip(layer_a.state_dict().items(), layer_b.state_dict().values()):
        assert torch.equal(a, b), k


def test_cpu_clock_profiles_pair_with_cpu_clock_throughputs() -> None:
    prof = RunProfile(Throughput(gemm=1e9, conv=1e9, clock="cpu"), clock="cpu")
    with prof.phase("optimisation"):
        sum(range(200_000))  # CPU work is counted
    assert prof.phases["optimisation"].seconds > 0
    with pytest.raises(ValueError, match="measured with the 'wall' clock"):
        RunProfile(TP, clock="cpu")
    with pytest.raises(ValueError, match="cannot merge"):
        RunProfile(TP).merge(prof)
    with pytest.raises(ValueError, match="unknown clock 'gpu'"):
        RunProfile(clock="gpu")


def test_quantize_inside_profiling_reports_its_phases_against_their_bound() -> None:
    from tests.conftest import make_batches, make_tiny_cnn
    from hf_adaquant import AdaQuantConfig, quantize
    from hf_adaquant.utils.profiling import profiling

    batches = make_batches(2, 8)
    config = AdaQuantConfig(weight_bits=4, activation_bits=8, pipeline="advanced", iterations=3, bias_tuning=False,
                            bn_tuning=False, progress=False, seed=0)
    with profiling() as prof:
        qmodel = quantize(make_tiny_cnn(0, batches), batches, config)
    rows = {r["phase"]: r for r in qmodel.hf_adaquant_report.profile["phases"]}
    assert rows["optimisation"]["gflop"] > 0 and rows["optimisation"]["bound_s"] > 0
    assert rows["optimisation"]["ratio"] == pytest.approx(rows["optimisation"]["measured_s"]
                                                          / rows["optimisation"]["bound_s"])
    assert rows["pipeline/adaquant"]["measured_s"] >= rows["optimisation"]["measured_s"]
    assert quantize(make_tiny_cnn(0, batches), batches, config).hf_adaquant_report.profile is None  # off outside
