"""Tests of mixed-precision bit allocation: sensitivities, cache, budgets, pins, quantize() integration, sweeps."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hf_adaquant import AdaQuantConfig, quantize
from hf_adaquant.allocation import (
    FLOAT_ACTIVATION_BITS,
    AllocationProblem,
    BitOption,
    InfeasibleBudgetError,
    allocate_bits,
    allocation_to_layer_bits,
    measure_sensitivity,
    plot_bits_per_layer,
    plot_pareto,
)
from hf_adaquant.allocation import sensitivity as sensitivity_module
from hf_adaquant.calibrate import qmodules
from hf_adaquant.data import shared_dir
from hf_adaquant.size import model_size
from hf_adaquant.sweep import pareto_sweep

LAYERS = ["0", "3", "5", "9"]  # the quantizable layers of tiny_model(), in execution order


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.1, 0.1)
        model[1].running_var.uniform_(0.5, 1.5)
        model[9].weight.mul_(20.0)  # confident logits: KL differences well above float noise
    return model.eval()


def tiny_batches(n: int = 64, seed: int = 1) -> list[torch.Tensor]:
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return [x[: n // 2], x[n // 2:]]


def light(**kw) -> AdaQuantConfig:
    return AdaQuantConfig(**{"pipeline": "light", "progress": False, **kw})


def quantized_bits(qmodel: nn.Module) -> dict[str, tuple[int, int | None]]:
    return {name: (m.weight_bits, m.activation_bits) for name, m in qmodules(qmodel).items()}


# ----------------------------------------------------------------------------------------------------------------
# Sensitivity
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", ["light", "advanced"])
def test_sensitivity_matrix_shape_and_order(pipeline: str) -> None:
    model = tiny_model()
    before = [p.clone() for p in model.state_dict().values()]
    config = AdaQuantConfig(pipeline=pipeline, first_last_bits=None, candidate_weight_bits=[2, 4, 8],
                            candidate_activation_bits=[8], iterations=10, progress=False)
    problem = measure_sensitivity(model, tiny_batches(), config, progress=False)
    assert isinstance(problem, AllocationProblem)
    assert problem.layer_names == LAYERS
    assert [o.label for o in problem.options] == ["W2A8", "W4A8", "W8A8"]
    assert problem.sensitivity.shape == (4, 3)
    assert np.isfinite(problem.sensitivity).all()
    assert (problem.sensitivity >= -1e-9).all()  # KL against the FP model
    # Fewer weight bits => larger loss increase, for every layer.
    assert (problem.sensitivity[:, 0] > problem.sensitivity[:, 1]).all()
    assert (problem.sensitivity[:, 1] > problem.sensitivity[:, 2]).all()
    assert problem.num_params.tolist() == [8 * 27, 16 * 72, 32 * 144, 320]
    assert problem.macs.tolist() == [64 * 8 * 27, 64 * 16 * 72, 64 * 32 * 144, 320]
    assert problem.pinned == {}
    # The model is untouched.
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_first_last_policy_pins_and_skips_measurement() -> None:
    problem = measure_sensitivity(tiny_model(), tiny_batches(), light(candidate_weight_bits=[2, 4],
                                                                     candidate_activation_bits=[4]), progress=False)
    # The first/last W8A8 pin is not a candidate: appended, allowed only for the pinned layers.
    assert [o.label for o in problem.options] == ["W2A4", "W4A4", "W8A8"]
    assert problem.pinned == {"0": BitOption(8, 8), "9": BitOption(8, 8)}
    assert np.isnan(problem.sensitivity[[0, 3]]).all()
    assert np.isfinite(problem.sensitivity[1:3, :2]).all() and np.isnan(problem.sensitivity[1:3, 2]).all()


def test_mse_and_task_criteria() -> None:
    model, batches = tiny_model(), tiny_batches()
    mse = measure_sensitivity(model, batches, light(first_last_bits=None, candidate_weight_bits=[2, 8],
                                                    candidate_activation_bits=[8], sensitivity_criterion="mse"),
                              progress=False)
    assert (mse.sensitivity[:, 0] > mse.sensitivity[:, 1]).all()
    task = light(first_last_bits=None, candidate_weight_bits=[2, 8], candidate_activation_bits=[8],
                 sensitivity_criterion="task")
    with pytest.raises(ValueError, match="needs labels"):
        measure_sensitivity(model, batches, task, progress=False)
    with pytest.raises(ValueError, match="needs labels"):
        quantize(model, batches, task.replace(size_budget=0.5))
    with torch.no_grad():
        labels = torch.cat([model(b).argmax(-1) for b in batches])  # the FP model is right on all of them
    problem = measure_sensitivity(model, batches, task, labels=labels, progress=False)
    assert problem.sensitivity.shape == (4, 2) and np.isfinite(problem.sensitivity).all()
    # Cross-entropy increases can be negative (a quantized layer can sharpen correct logits); W8 barely moves it.
    assert np.abs(problem.sensitivity[:, 1]).max() < np.abs(problem.sensitivity[:, 0]).max()
    # Evaluation on a prefix of the calibration samples (labels sliced along, the last batch cut short).
    part = measure_sensitivity(model, batches, task, labels=labels, max_eval_samples=40, progress=False)
    assert np.isfinite(part.sensitivity).all() and not np.allclose(part.sensitivity, problem.sensitivity)
    # A custom loss (here: a per-batch label list and a loss that ignores the model) gives zero increase.
    flat = measure_sensitivity(model, batches, task, labels=[labels[:32], labels[32:]],
                               loss_fn=lambda out, y: torch.tensor(1.0), progress=False)
    assert np.allclose(flat.sensitivity, 0.0)


def test_weight_only_options_keep_activations_float() -> None:
    config = light(activation_bits=None, candidate_weight_bits=[2, 4], size_budget=0.2)
    qmodel = quantize(tiny_model(), tiny_batches(), config)
    report = qmodel.hf_adaquant_report
    options = {tuple(o.values()) for o in report.allocation["assignment"].values()}
    assert all(a == FLOAT_ACTIVATION_BITS for _, a in options)
    assert all(a is None for _, a in quantized_bits(qmodel).values())
    assert all(bits[1] is None for bits in report.config["layer_bits"].values())


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


def test_cache_reuse_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    model, batches = tiny_model(), tiny_batches()
    path = tmp_path / "sens.json"
    config = light(candidate_weight_bits=[2, 4, 8], candidate_activation_bits=[4, 8])
    first = measure_sensitivity(model, batches, config, cache_path=path, progress=False)
    assert json.loads(path.read_text())["fingerprint"]["layer_names"] == LAYERS

    calls = []
    real_fit = sensitivity_module._fit_layer

    def counting_fit(*args, **kwargs):
        calls.append(args[1])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sensitivity_module, "_fit_layer", counting_fit)
    start = time.perf_counter()
    second = measure_sensitivity(model, batches, config, cache_path=path, progress=False)
    assert time.perf_counter() - start < 1.0
    assert calls == []
    np.testing.assert_array_equal(second.sensitivity, first.sensitivity)
    assert second.to_dict() == first.to_dict()
    # AdaQuant hyper-parameters do not matter for the light pipeline: still cached.
    measure_sensitivity(model, batches, config.replace(iterations=3, lr_weight=0.5), cache_path=path,
                        progress=False)
    assert calls == []

    # A field that changes sensitivities: recomputed (and the reason logged), cache overwritten.
    changed = config.replace(weight_range_method="minmax")
    with caplog.at_level(logging.WARNING, logger="hf_adaquant.allocation.sensitivity"):
        third = measure_sensitivity(model, batches, changed, cache_path=path, progress=False)
    assert len(calls) == 2 * 6  # two unpinned layers x six options
    assert "weight_range_method" in caplog.text
    assert json.loads(path.read_text())["fingerprint"]["weight_range_method"] == "minmax"
    assert not np.array_equal(np.nan_to_num(third.sensitivity), np.nan_to_num(first.sensitivity))

    # Other calibration data or other weights: recomputed too.
    calls.clear()
    measure_sensitivity(model, tiny_batches(seed=2), changed, cache_path=path, progress=False)
    assert len(calls) == 12
    calls.clear()
    other = tiny_model()
    with torch.no_grad():
        other[3].weight.mul_(1.01)
    measure_sensitivity(other, tiny_batches(seed=2), changed, cache_path=path, progress=False)
    assert len(calls) == 12
    calls.clear()
    measure_sensitivity(other, tiny_batches(seed=2), changed, cache_path=path, max_eval_samples=16, progress=False)
    assert len(calls) == 12


# ----------------------------------------------------------------------------------------------------------------
# Budgets, pins, quantize() integration
# ----------------------------------------------------------------------------------------------------------------


def test_quantize_with_size_budget_end_to_end() -> None:
    model, batches = tiny_model(), tiny_batches()
    config = AdaQuantConfig(size_budget=0.2, iterations=10, bias_tuning_steps=5, progress=False)  # advanced
    qmodel = quantize(model, batches, config)
    report = qmodel.hf_adaquant_report
    assert report.allocation is not None and "bit_allocation" in report.stage_seconds
    assignment = {name: (o["weight_bits"], o["activation_bits"]) for name, o in report.allocation["assignment"].items()}
    assert list(assignment) == LAYERS
    # The allocation is the saved config's layer_bits, and the real model has exactly those bits.
    assert {k: tuple(v) for k, v in report.config["layer_bits"].items()} == assignment
    assert quantized_bits(qmodel) == assignment
    # The saved config holds the allocated bits and no budget (both would not validate); the report keeps it.
    assert report.config["size_budget"] is None and report.allocation["budget"]["size_budget"] == 0.2
    # Budget respected by the real quantized model.
    size = model_size(qmodel)
    assert size.quantized_weight_bits <= 0.2 * 32 * size.quantized_params
    assert size.quantized_weight_bits == report.allocation["weight_bits_total"]
    # Mixed precision: the budget (6.4 bits/weight on average) is not met by a single option.
    assert len({w for w, _ in assignment.values()}) > 1
    assert json.loads(json.dumps(report.to_dict()))["allocation"] == report.allocation

    # Re-running from the saved config reuses layer_bits (no new allocation) and gives the same bits.
    again = quantize(model, batches, AdaQuantConfig.from_dict(report.config))
    assert again.hf_adaquant_report.allocation is None
    assert quantized_bits(again) == assignment


def test_bops_budget_respected() -> None:
    model, batches = tiny_model(), tiny_batches()
    config = light(first_last_bits=None, size_budget=None, bops_budget=0.02)
    qmodel = quantize(model, batches, config)
    report = qmodel.hf_adaquant_report
    problem = measure_sensitivity(model, batches, config.replace(bops_budget=None), progress=False)
    bits = quantized_bits(qmodel)
    bops = sum(m * bits[n][0] * bits[n][1] for n, m in zip(problem.layer_names, problem.macs))
    assert bops <= 0.02 * problem.fp32_bops
    assert bops == pytest.approx(report.allocation["bops"])


def test_infeasible_budget_raises_fast_with_smallest_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_measuring(*args, **kwargs):
        raise AssertionError("sensitivities measured before the budget check")

    monkeypatch.setattr(sensitivity_module, "_fit_layer", no_measuring)
    model, batches = tiny_model(), tiny_batches()
    params = {"0": 8 * 27, "3": 16 * 72, "5": 32 * 144, "9": 320}
    # First/last pinned at 8 bits, the rest at the smallest candidate (2 bits).
    smallest = (8 * (params["0"] + params["9"]) + 2 * (params["3"] + params["5"])) / (32 * sum(params.values()))
    start = time.perf_counter()
    with pytest.raises(InfeasibleBudgetError) as info:
        quantize(model, batches, light(size_budget=0.05))
    assert time.perf_counter() - start < 5.0
    assert isinstance(info.value, ValueError)
    assert info.value.min_size_budget == pytest.approx(smallest)
    assert "smallest feasible is" in str(info.value)
    assert repr(smallest)[:6] in str(info.value)
    # Bytes as the unit: the smallest budget in bytes.
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible is") as info:
        measure_sensitivity(model, batches, light(size_budget=10, size_budget_unit="bytes"), progress=False)
    assert info.value.min_size_budget == pytest.approx(smallest * 4 * sum(params.values()))


def test_pins_and_first_last_policy_honoured_in_final_model() -> None:
    model, batches = tiny_model(), tiny_batches()
    # A tight budget would like every layer at W2; the policy and the pin win.
    config = light(size_budget=0.3, candidate_weight_bits=[2, 3, 4], candidate_activation_bits=[4],
                   pinned_layers={"5": (6, 5)})
    qmodel = quantize(model, batches, config)
    bits = quantized_bits(qmodel)
    assert bits["0"] == (8, 8) and bits["9"] == (8, 8)  # first/last policy (first_last_bits=8)
    assert bits["5"] == (6, 5)  # explicit pin, not a candidate
    assert bits["3"][0] in (2, 3, 4) and bits["3"][1] == 4
    assert model_size(qmodel).quantized_weight_bits <= 0.3 * 32 * model_size(qmodel).quantized_params

    # Without the first/last policy a tight budget takes the first/last layers down too.
    free = quantize(model, batches, light(first_last_bits=None, size_budget=2 / 32 + 1e-9,
                                          candidate_weight_bits=[2, 4], candidate_activation_bits=[4, 8]))
    assert {w for w, _ in quantized_bits(free).values()} == {2}

    with pytest.raises(ValueError, match="not quantized layers"):
        measure_sensitivity(model, batches, light(pinned_layers={"nope": (4, 4)}), progress=False)


def test_allocate_bits_needs_a_budget() -> None:
    problem = measure_sensitivity(tiny_model(), tiny_batches(), light(candidate_weight_bits=[2, 8],
                                                                     candidate_activation_bits=[8]), progress=False)
    with pytest.raises(ValueError, match="needs a budget"):
        allocate_bits(problem, light())
    allocation = allocate_bits(problem, light(size_budget=1.0))
    assert allocation_to_layer_bits(allocation) == {name: (8, 8) for name in LAYERS}


# ----------------------------------------------------------------------------------------------------------------
# Sweep and plots
# ----------------------------------------------------------------------------------------------------------------


def test_pareto_sweep_and_plots(tmp_path: Path) -> None:
    model, batches = tiny_model(), tiny_batches()
    x_eval = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_eval = model(x_eval).argmax(-1)

    def top1(m: nn.Module) -> float:
        with torch.no_grad():
            return 100.0 * (m(x_eval).argmax(-1) == y_eval).float().mean().item()

    config = light(candidate_weight_bits=[2, 4, 8], candidate_activation_bits=[4, 8])
    rows = pareto_sweep(model, batches, config, [0.01, 0.2, 0.3], top1, cache_path=tmp_path / "sens.json")
    assert (tmp_path / "sens.json").exists()
    assert len(rows) == 3
    assert "error" in rows[0] and rows[0]["min_size_budget"] > 0.01
    for row in rows[1:]:
        assert row["size_fraction"] <= row["budget"]
        assert row["fp_metric"] == 100.0
        assert 0.0 <= row["metric"] <= 100.0
        assert set(row["assignment"]) == set(LAYERS)
        assert row["uniform"] is not None and row["uniform"]["size_fraction"] <= row["size_fraction"]
    assert rows[2]["predicted_criterion"] <= rows[1]["predicted_criterion"]

    pytest.importorskip("matplotlib")
    plot_pareto(rows, tmp_path / "pareto.png")
    plot_bits_per_layer(rows[1]["allocation"], tmp_path / "bits.png")
    plot_bits_per_layer({"a": (4, None), "b": (2, 8)}, tmp_path / "bits2.png")
    for name in ("pareto.png", "bits.png", "bits2.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------------
# Real model
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shared_dir() is None, reason="shared/ (CIFAR-10 ResNet-20 checkpoint and data) not available")
def test_resnet20_first_conv_more_sensitive_than_middle_layer() -> None:
    from hf_adaquant.data import load_cifar10_npz
    from hf_adaquant.models import load_cifar_resnet

    shared = shared_dir()
    ckpt = next((shared / "models" / "cifar10-resnet").glob("resnet20-*.th"))
    model = load_cifar_resnet(20, ckpt)
    x, _ = load_cifar10_npz(shared / "data" / "cifar10" / "calib.npz", limit=128)
    # Only the two layers compared are measured (include), at W2A4; first_last_bits=None so conv1 is not pinned.
    config = light(first_last_bits=None, include=["conv1", "layer2.1.conv1"], candidate_weight_bits=[2],
                   candidate_activation_bits=[4])
    problem = measure_sensitivity(model, [x[:64], x[64:]], config, progress=False)
    sens = dict(zip(problem.layer_names, problem.sensitivity[:, 0]))
    assert sens["conv1"] > sens["layer2.1.conv1"] > 0
