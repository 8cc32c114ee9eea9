"""Block reconstruction (reconstruction="block") and dropped activation quantization (activation_drop, QDrop)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from tests.conftest import fast_config, make_batches, make_tiny_cnn
from torch import nn

from hf_adaquant import AdaQuantConfig, prepare_model
from hf_adaquant.adaquant import block, run_adaquant
from hf_adaquant.adaquant.spill import CacheBudget, SpillDir
from hf_adaquant.adaquant.staged import StagedRunner
from hf_adaquant.adaquant.stages import find_stage_plan
from hf_adaquant.distributed import WorkDir
from hf_adaquant.models.cifar_resnet import CifarResNet
from hf_adaquant.utils.seeding import make_generator


def _resnet(blocks: tuple[int, int, int] = (1, 1, 1)) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    return CifarResNet(blocks).eval(), make_batches(2, 8)


def _config(**changes: object) -> AdaQuantConfig:
    return fast_config(**{"iterations": 12, "cache_dtype": "float32", "bias_tuning_steps": 0,
                          "reconstruction": "block", **changes})


def _run(model: nn.Module, batches, config: AdaQuantConfig, **kwargs):
    prepared = prepare_model(copy.deepcopy(model), batches[0], config)
    reports = run_adaquant(prepared.qmodel, prepared.fp_model, list(prepared.plan), batches, config, **kwargs)
    return prepared, reports


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    want, got = a.state_dict(), b.state_dict()
    assert list(want) == list(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


@torch.no_grad()
def _block_mses(prepared, batches) -> list[float]:
    """Each block's output MSE against the FP block, its inputs from the quantized prefix (the blocks' loss)."""
    names = list(prepared.plan)
    plan, why = find_stage_plan(prepared.fp_model, names, batches[0])
    assert plan is not None, why
    out = []
    with StagedRunner(plan, prepared.qmodel, prepared.fp_model, batches, dtype=torch.float32,
                      budget=CacheBudget(1 << 30), spill=SpillDir()) as staged:
        for i, name in enumerate(plan.blocks):
            targets = staged.fp_block_outputs(i)
            total = count = 0
            for k in range(len(batches)):
                args, kwargs = staged.block_inputs(i, k)
                y = block._output(prepared.qmodel.get_submodule(name)(*args, **kwargs))
                total += float(torch.nn.functional.mse_loss(y, block._output(targets.get(k)))) * len(y)
                count += len(y)
            out.append(total / count)
    return out


# ------------------------------------------------------------------------------------------- block vs layer


def test_block_mode_lowers_block_output_mse_below_layer_mode() -> None:
    torch.manual_seed(1)
    model, batches = CifarResNet((1, 1, 1)).eval(), make_batches(2, 8, seed=1)
    # Same iterations, rates and seed. At a few dozen steps with the default rates the two modes are within a few
    # percent (W' moves ~lr steps per iteration); with 10x rates the joint fit pulls ahead along the depth
    # (final-stage ratio 0.88-0.94 over seeds 0-3 at 150 steps).
    config = _config(iterations=100, lr_weight=1e-2, lr_weight_scale=1e-2)
    layer, _ = _run(model, batches, config.replace(reconstruction="layer"))
    blocks, reports = _run(model, batches, config)
    layer_mse, block_mse = _block_mses(layer, batches), _block_mses(blocks, batches)
    assert block_mse[-1] < 0.95 * layer_mse[-1], (block_mse, layer_mse)
    assert block_mse[1] < layer_mse[1], (block_mse, layer_mse)
    # The reports of a block's layers carry the block's MSE (as measured here) and never get worse.
    by_name = {r.name: r for r in reports}
    for name, mse in zip(("layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"), block_mse):
        assert by_name[name].mse_after <= by_name[name].mse_before
        assert by_name[name].mse_after == pytest.approx(mse, rel=1e-4)


def test_block_mode_initialises_output_ranges_from_the_fp_outputs() -> None:
    """Output quantizers (residual_output_bits) in block reconstruction: ranges set before the block is evaluated,
    the block's loss no worse after optimisation."""
    model, batches = _resnet()
    prepared, reports = _run(model, batches, _config(residual_output_bits=8))
    assert prepared.residual_layers == ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"]
    for name in prepared.residual_layers:
        assert bool(prepared.qmodel.get_submodule(name).output_quantizer.initialized)
    for report in reports:
        assert report.mse_after <= report.mse_before


def test_model_without_stages_falls_back_to_layer_mode_with_a_warning(caplog) -> None:
    batches = make_batches(2, 4)
    model = make_tiny_cnn(0, batches)
    with caplog.at_level(logging.WARNING, logger="hf_adaquant.adaquant.runner"):
        fallback, _ = _run(model, batches, _config(iterations=3))
    messages = [r.getMessage() for r in caplog.records if "falls back to per-layer" in r.getMessage()]
    assert len(messages) == 1 and "no nn.Sequential / nn.ModuleList container" in messages[0]
    layer, _ = _run(model, batches, _config(iterations=3, reconstruction="layer"))
    _assert_same_state(layer.qmodel, fallback.qmodel)


# ------------------------------------------------------------------------------------------------ QDrop


def test_drop_inputs_mask_semantics_and_restores_the_layers() -> None:
    model, batches = _resnet()
    prepared = prepare_model(copy.deepcopy(model), batches[0], _config())
    layer = prepared.qmodel.get_submodule("layer1.0.conv1")
    layer.input_quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    layer.weight_quantizer.set_range(layer.weight.detach().amin((1, 2, 3)), layer.weight.detach().amax((1, 2, 3)))
    x = torch.randn(2, 16, 8, 8)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    quantized = layer(x)
    q_in = layer.input_quantizer(x)
    assert not torch.equal(q_in, x)
    seen = []
    with block.drop_inputs({"c": layer}, 0.0, make_generator(0)):
        assert torch.equal(layer(x), quantized)  # drop 0: every element quantized
    with block.drop_inputs({"c": layer}, 1.0, make_generator(0)):
        seen.append(layer.quantize_input(x))
    assert torch.equal(seen[0], x)  # drop 1: every element left in float
    masks = []
    for _ in range(2):
        with block.drop_inputs({"c": layer}, 0.5, make_generator(7)):
            masks.append(layer.quantize_input(x) == x)
    assert torch.equal(masks[0], masks[1])  # seeded: the same mask for the same seed
    changed = q_in != x
    kept_float = (masks[0] & changed).sum() / changed.sum()
    assert 0.4 < float(kept_float) < 0.6
    assert "quantize_input" not in layer.__dict__ and torch.equal(layer(x), quantized)
    after = layer.state_dict()
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_drop_zero_through_the_mask_equals_plain_block_reconstruction(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = _resnet()
    plain, plain_reports = _run(model, batches, _config())
    # Force the masked path even at p = 0: quantizing every element must give the plain result bitwise.
    monkeypatch.setattr(block, "_drop_context", block.drop_inputs)
    masked, masked_reports = _run(model, batches, _config(activation_drop=0.0))
    _assert_same_state(plain.qmodel, masked.qmodel)
    assert [r.mse_after for r in plain_reports] == [r.mse_after for r in masked_reports]


def test_drop_trains_on_masks_but_evaluates_fully_quantized(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = _resnet()
    real_evaluate, real_forward = block._evaluate, block._forward
    wrapped_during = {"evaluation": 0, "steps": 0}

    def evaluate(module, data):
        wrapped_during["evaluation"] += sum("quantize_input" in m.__dict__ for m in module.modules())
        return real_evaluate(module, data)

    def forward(module, args, kwargs, target):
        if torch.is_grad_enabled():
            wrapped_during["steps"] += sum("quantize_input" in m.__dict__ for m in module.modules())
        return real_forward(module, args, kwargs, target)

    monkeypatch.setattr(block, "_evaluate", evaluate)
    monkeypatch.setattr(block, "_forward", forward)
    first, reports = _run(model, batches, _config(activation_drop=0.5))
    assert wrapped_during["evaluation"] == 0 and wrapped_during["steps"] > 0
    assert not any("quantize_input" in m.__dict__ for m in first.qmodel.modules())  # final model quantizes
    again, _ = _run(model, batches, _config(activation_drop=0.5))
    _assert_same_state(first.qmodel, again.qmodel)  # fixed seed: the same masks, the same model
    plain, _ = _run(model, batches, _config())
    assert not torch.equal(first.qmodel.state_dict()["layer1.0.conv2.weight"],
                           plain.qmodel.state_dict()["layer1.0.conv2.weight"])
    # The reported block MSE is the fully quantized one.
    by_name = {r.name: r for r in reports}
    assert by_name["layer3.0.conv2"].mse_after == pytest.approx(_block_mses(first, batches)[-1], rel=1e-4)


# ------------------------------------------------------------------------------------------ transformers


def test_block_mode_on_a_bert_layer_with_a_padding_mask(padded_tiny_bert) -> None:
    model, batches = padded_tiny_bert
    config = _config(weight_bits=4, activation_bits=8, batch_size=2)  # steps take 2-sample slices of a batch
    prepared, reports = _run(model, batches, config)
    by_name = {r.name: r for r in reports}
    layer1 = [n for n in by_name if n.startswith("bert.encoder.layer.1.")]
    assert len(layer1) == 6 and len({by_name[n].mse_after for n in layer1}) == 1  # one joint optimisation
    assert by_name[layer1[0]].mse_after < by_name[layer1[0]].mse_before
    mses = _block_mses(prepared, batches)
    assert by_name[layer1[0]].mse_after == pytest.approx(mses[1], rel=1e-4)
    # The block replays with the shared padding mask (block 0's input 1) next to the hidden states.
    plan, _ = find_stage_plan(prepared.fp_model, list(prepared.plan), batches[0])
    assert ("ref", 1) in plan.templates[1][0]


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("stop_after", [2, 3])  # inside block layer1.0 (its conv1 saved, conv2 not), after it
def test_block_resume_after_kill_is_bitwise_equal(stop_after: int, tmp_path: Path, monkeypatch) -> None:
    model, batches = _resnet()
    config = _config()
    reference, ref_reports = _run(model, batches, config)
    real_save, saved = WorkDir.save_layer, []

    def save_then_stop(self, name, layer, report):
        real_save(self, name, layer, report)
        saved.append(name)
        if len(saved) == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkDir, "save_layer", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(model, batches, config, work_dir=tmp_path / "work")
    monkeypatch.setattr(WorkDir, "save_layer", real_save)
    optimised = []
    real_block = block.optimize_block
    monkeypatch.setattr(block, "optimize_block", lambda b, layers, *a, **k: optimised.append(list(layers))
                        or real_block(b, layers, *a, **k))
    resumed, reports = _run(model, batches, config, work_dir=tmp_path / "work")
    # A partly checkpointed block is optimised again as a whole; a finished one is not.
    assert optimised[0][0] == ("layer1.0.conv1" if stop_after == 2 else "layer2.0.conv1")
    assert [r.to_dict() | {"seconds": 0} for r in reports] == [r.to_dict() | {"seconds": 0} for r in ref_reports]
    _assert_same_state(reference.qmodel, resumed.qmodel)


# ------------------------------------------------------------------------------------------- learned rounding


@pytest.mark.parametrize("reconstruction", ["layer", "block"])
def test_learned_rounding_at_4_bits_lowers_the_mse_of_nearest_rounding(reconstruction: str) -> None:
    model, batches = _resnet()
    config = _config(reconstruction=reconstruction, weight_rounding="learned", weight_bits=4, iterations=20)
    prepared, reports = _run(model, batches, config)
    # mse_before: round-to-nearest at the initial ranges; after: learned rounding (hard, on the same grid).
    improved = [r for r in reports if r.mse_after < r.mse_before]
    assert len(improved) >= len(reports) - 1, [(r.name, r.mse_before, r.mse_after) for r in reports]
    assert all(r.mse_after <= r.mse_before for r in reports)
    # Learned weights lie on the grid: quantizing them again changes nothing.
    conv = prepared.qmodel.get_submodule("layer2.0.conv1")
    assert torch.allclose(conv.weight_quantizer(conv.weight), conv.weight, atol=1e-6)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("changes, message", [
    ({"reconstruction": "blocks"}, r"reconstruction must be one of \['layer', 'block'\], got 'blocks'"),
    ({"reconstruction": None}, r"reconstruction must be one of \['layer', 'block'\]"),
    ({"reconstruction": "block", "activation_drop": 1.5}, r"activation_drop must be a finite number in \[0, 1\]"),
    ({"reconstruction": "block", "activation_drop": -0.1}, r"activation_drop must be a finite number >= 0"),
    ({"reconstruction": "block", "activation_drop": "0.5"}, r"activation_drop must be .*got the string '0.5'"),
    ({"reconstruction": "block", "variant": "parallel"},
     r"reconstruction='block' needs variant='sequential'.*accepted reconstructions with the parallel variant: "
     r"\['layer'\]"),
    ({"activation_drop": 0.5}, r"activation_drop=0.5 applies to reconstruction='block' only"),
])
def test_bad_values_list_the_accepted_ones(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaQuantConfig(**changes)


def test_new_fields_round_trip_and_enter_the_work_dir_fingerprint() -> None:
    from hf_adaquant.distributed import run_fingerprint

    config = AdaQuantConfig(reconstruction="block", activation_drop=0.5)
    assert AdaQuantConfig.from_dict(config.to_dict()) == config
    model, batches = _resnet()
    prepared = prepare_model(copy.deepcopy(model), batches[0], config)
    names = list(prepared.plan)
    prints = [run_fingerprint(c, prepared.qmodel, prepared.fp_model, names, batches)["config"]
              for c in (config, config.replace(activation_drop=0.25), config.replace(reconstruction="layer",
                                                                                      activation_drop=0.0))]
    assert prints[0] != prints[1] and prints[0] != prints[2]
