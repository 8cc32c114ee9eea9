"""Staged propagation: the sequential variant's layers see exactly the inputs of whole-model captures, with
O(depth) forward work, bounded memory, one spill directory that never outlives the run, and bitwise resume."""

from __future__ import annotations

import copy
import errno
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import fast_config, make_batches, make_tiny_cnn
from torch import nn

from hf_adaquant import prepare_model
from hf_adaquant.adaquant import layerwise, run_adaquant, runner, spill
from hf_adaquant.adaquant.stages import find_stage_plan
from hf_adaquant.distributed import WorkDir
from hf_adaquant.models.cifar_resnet import CifarResNet

_OPTIMIZE_LAYER = layerwise.optimize_layer
RESNET_BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3) for b in (0, 1)]


def _resnet() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    batches = make_batches(3, 4)
    return CifarResNet((2, 2, 2)).eval(), batches


def _config(**changes: object):
    return fast_config(**{"iterations": 3, "cache_dtype": "float32", "bias_tuning_steps": 0, **changes})


def _spy_inputs(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Record the (inputs, targets) each layer is optimised on."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def spy(layer, cache, *args, **kwargs):
        xs, ys = zip(*cache.iterate(10_000))
        seen[kwargs.get("name", "")] = (torch.cat(xs), torch.cat(ys))
        return _OPTIMIZE_LAYER(layer, cache, *args, **kwargs)  # the real one, never an earlier spy

    monkeypatch.setattr(layerwise, "optimize_layer", spy)
    return seen


def _run(model: nn.Module, batches, config, monkeypatch, **kwargs):
    prepared = prepare_model(copy.deepcopy(model), batches[0], config)
    seen = _spy_inputs(monkeypatch)
    reports = run_adaquant(prepared.qmodel, prepared.fp_model, list(prepared.plan), batches, config, **kwargs)
    return prepared, seen, reports


def _count_block_runs(model: nn.Module, blocks: list[str]) -> list[int]:
    """Complete runs of the blocks (their last module ran; a skipped or stopped block does not count)."""
    counter = [0]
    for name in blocks:
        model.get_submodule(f"{name}.relu2").register_forward_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
    return counter


def _assert_same_inputs(a: dict, b: dict, names: list[str]) -> None:
    assert list(a) == list(b) == names
    for name in names:
        for got, want in zip(a[name], b[name]):
            assert got.shape == want.shape, name
            assert torch.allclose(got, want, rtol=0, atol=1e-6), (name, float((got - want).abs().max()))


# ------------------------------------------------------------------------------------------- equivalence


def test_resnet_layers_see_the_whole_model_inputs_with_linear_work(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = _resnet()
    config = _config()
    prepared = prepare_model(copy.deepcopy(model), batches[0], config)
    names = list(prepared.plan)
    plan, why = find_stage_plan(prepared.fp_model, names, batches[0])
    assert plan is not None, why
    assert plan.blocks == RESNET_BLOCKS
    assert plan.stage_of["conv1"] == -1 and plan.stage_of["linear"] == plan.head == 6
    assert plan.stage_of["layer2.0.conv2"] == 2

    runs = {}
    results = {}
    for staged in (True, False):
        prepared = prepare_model(copy.deepcopy(model), batches[0], config)
        counters = [_count_block_runs(m, RESNET_BLOCKS) for m in (prepared.qmodel, prepared.fp_model)]
        seen = _spy_inputs(monkeypatch)
        run_adaquant(prepared.qmodel, prepared.fp_model, names, batches, config.replace(staged_propagation=staged))
        runs[staged] = sum(c[0] for c in counters)
        results[staged] = (seen, prepared.qmodel.state_dict())
    _assert_same_inputs(results[True][0], results[False][0], names)
    for k, v in results[True][1].items():
        assert torch.allclose(v.float(), results[False][1][k].float(), atol=1e-6), k
    # Per model and batch each block runs through once, to advance the boundary (plus once in the FP model to
    # trace the stages); captures stop inside it. Whole-model captures run it again for every later layer.
    assert runs[True] == 2 * len(batches) * len(RESNET_BLOCKS) + len(RESNET_BLOCKS)
    assert runs[False] > 2 * runs[True]


def test_bert_layers_see_the_whole_model_inputs_with_padding_mask(padded_tiny_bert,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = padded_tiny_bert
    config = _config(weight_bits=4, activation_bits=8)
    prepared = prepare_model(copy.deepcopy(model), batches[0], config)
    names = list(prepared.plan)
    plan, why = find_stage_plan(prepared.fp_model, names, batches[0])
    assert plan is not None, why
    assert plan.blocks == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    assert plan.stage_of["classifier"] == plan.head
    args, kwargs = plan.templates[1]
    assert args[0] == ("chain", "same") and ("ref", 1) in args  # hidden states; the mask shared by both layers
    staged = _run(model, batches, config, monkeypatch)[1]
    whole = _run(model, batches, config.replace(staged_propagation=False), monkeypatch)[1]
    _assert_same_inputs(staged, whole, names)
    # The mask matters: padded positions would change layer 1's attention inputs if it were dropped.
    assert any(n.startswith("bert.encoder.layer.1.") for n in names)


class _InplaceBlock(nn.Module):
    """Modifies its input in place: a replayed stage must not corrupt the stored boundary."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(x.mul_(1.5))
        return self.proj(self.body(x)) - 0.5 * x


class _NestedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(*[_InplaceBlock(8) for _ in range(3)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_finest_chain_cut_wins_and_inplace_ops_do_not_corrupt_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """``blocks.i.body`` (inner Sequentials) is not a chain (the 1x1 conv runs between them): ``blocks.i`` is."""
    torch.manual_seed(0)
    model = _NestedNet().eval()
    batches = make_batches(2, 4)
    config = _config(first_last_bits=None)
    prepared = prepare_model(copy.deepcopy(model), batches[0], config)
    names = list(prepared.plan)
    plan, why = find_stage_plan(prepared.fp_model, names, batches[0])
    assert plan is not None and plan.blocks == ["blocks.0", "blocks.1", "blocks.2"], why
    staged = _run(model, batches, config, monkeypatch)[1]
    whole = _run(model, batches, config.replace(staged_propagation=False), monkeypatch)[1]
    _assert_same_inputs(staged, whole, names)


def test_model_without_stages_logs_why_and_uses_whole_model_captures(caplog, monkeypatch) -> None:
    batches = make_batches(2, 4)
    model = make_tiny_cnn(0, batches)
    with caplog.at_level(logging.INFO, logger="hf_adaquant.adaquant.runner"):
        _run(model, batches, _config(), monkeypatch)
    messages = [r.getMessage() for r in caplog.records if "staged propagation is off" in r.getMessage()]
    assert len(messages) == 1 and "no nn.Sequential / nn.ModuleList container" in messages[0]


# ----------------------------------------------------------------------------------- memory and spilling


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("hf_adaquant_cache_"))


def test_small_budget_spills_to_one_directory_removed_after_the_run(tmp_path: Path, monkeypatch) -> None:
    """Boundaries and layer caches go to disk past max_cache_bytes (in-memory peak stays within it), all under
    one directory that is gone afterwards; the result equals the in-memory run bitwise."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, batches = _resnet()
    reference = _run(model, batches, _config(), monkeypatch)[0].qmodel.state_dict()
    budgets: list[spill.CacheBudget] = []
    written: list[str] = []
    real_budget, real_save = spill.CacheBudget, spill.save_chunk

    def budget(max_bytes: int) -> spill.CacheBudget:
        budgets.append(real_budget(max_bytes))
        return budgets[-1]

    def save(path, t, what, spill_dir=None):
        written.append(path)
        return real_save(path, t, what, spill_dir)

    monkeypatch.setattr(runner, "CacheBudget", budget)
    monkeypatch.setattr(spill, "save_chunk", save)
    monkeypatch.setattr("hf_adaquant.adaquant.cache.save_chunk", save)
    limit = 40_000  # one block boundary of 12 samples (16x32x32 fp32) is ~196 kB
    prepared = _run(model, batches, _config(max_cache_bytes=limit), monkeypatch)[0]
    assert len(budgets) == 1 and 0 < budgets[0].peak <= limit
    assert {Path(p).parent for p in written} and len({Path(p).parent for p in written}) == 1
    assert any("boundary" in Path(p).name for p in written) and any("chunk" in Path(p).name for p in written)
    assert Path(written[0]).parent.parent == tmp_path
    assert _leftovers(tmp_path) == []
    state = prepared.qmodel.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_full_disk_names_the_directory_and_the_size_and_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, batches = _resnet()

    def full(path, array):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill.np, "save", full)
    with pytest.raises(spill.SpillError) as info:
        _run(model, batches, _config(max_cache_bytes=0), monkeypatch)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "no space left" in message and str(tmp_path / "hf_adaquant_cache_") in message
    assert "MiB" in message and "bytes" in message and "max_cache_bytes" in message
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_removes_its_spill_directory(error, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model, batches = _resnet()
    prepared = prepare_model(copy.deepcopy(model), batches[0], _config())
    calls = []

    def interrupted(layer, cache, *args, **kwargs):
        calls.append(kwargs.get("name"))
        if len(calls) == 4:  # mid-way through block layer1.1, with spilled boundaries on disk
            assert len(_leftovers(tmp_path)) == 1 and any((tmp_path / _leftovers(tmp_path)[0]).iterdir())
            raise error("stop")
        return real(layer, cache, *args, **kwargs)

    real = layerwise.optimize_layer
    monkeypatch.setattr(layerwise, "optimize_layer", interrupted)
    with pytest.raises(error):
        run_adaquant(prepared.qmodel, prepared.fp_model, list(prepared.plan), batches, _config(max_cache_bytes=0))
    assert len(calls) == 4 and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ resume


def test_interrupted_staged_run_resumes_bitwise_mid_block(tmp_path: Path, monkeypatch) -> None:
    """Stopped right after 4 checkpointed layers (inside block layer1.1), the resumed run loads them, advances
    the boundaries through them and ends bitwise where an uninterrupted run ends."""
    model, batches = _resnet()
    config = _config()
    reference, _, ref_reports = _run(model, batches, config, monkeypatch)
    real_save, saved = WorkDir.save_layer, []

    def save_then_stop(self, name, layer, report):
        real_save(self, name, layer, report)
        saved.append(name)
        if len(saved) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkDir, "save_layer", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _run(model, batches, config, monkeypatch, work_dir=tmp_path / "work")
    monkeypatch.setattr(WorkDir, "save_layer", real_save)
    resumed, seen, reports = _run(model, batches, config, monkeypatch, work_dir=tmp_path / "work")
    names = list(reference.plan)
    assert list(seen) == names[4:]
    assert [r.to_dict() | {"seconds": 0} for r in reports] == [r.to_dict() | {"seconds": 0} for r in ref_reports]
    want, got = reference.qmodel.state_dict(), resumed.qmodel.state_dict()
    assert list(want) == list(got) and all(torch.equal(want[k], got[k]) for k in want)


# ------------------------------------------------------------------------------- other stages on the engine


def test_per_layer_bias_correction_staged_equals_whole_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_adaquant import quantize
    from hf_adaquant.adaquant.staged import StagedRunner
    from hf_adaquant.tuning import bias

    model, batches = _resnet()
    config = fast_config(pipeline="light", bn_tuning=False, bias_correction=False)
    qmodel = quantize(copy.deepcopy(model), batches, config)
    prepared = prepare_model(copy.deepcopy(model), batches[0], config)
    names = list(prepared.plan)
    results, runs = {}, {}
    for staged in (True, False):
        q = copy.deepcopy(qmodel)
        counter = _count_block_runs(q, RESNET_BLOCKS)
        if not staged:
            monkeypatch.setattr(StagedRunner, "for_model", classmethod(lambda cls, *a, **k: (None, "off")))
        shifts = bias.correct_bias(q, prepared.fp_model, names, batches, method="per_layer")
        results[staged], runs[staged] = (shifts, {n: q.get_submodule(n).bias.detach() for n in names}), counter[0]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5, abs=1e-7)
    for n in names:
        assert torch.allclose(results[True][1][n], results[False][1][n], atol=1e-6), n
    assert any(v > 0 for v in results[True][0].values())
    assert runs[True] == len(batches) * len(RESNET_BLOCKS) and runs[False] > 2 * runs[True]


def test_sensitivity_captures_staged_equal_whole_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    from hf_adaquant.adaquant.staged import StagedRunner
    from hf_adaquant.allocation.sensitivity import measure_sensitivity

    model, batches = _resnet()
    config = fast_config(pipeline="light", candidate_weight_bits=[2, 4], candidate_activation_bits=[8],
                         cache_dtype="float32")
    captured = []
    real = StagedRunner.capture
    monkeypatch.setattr(StagedRunner, "capture", lambda self, name: captured.append(name) or real(self, name))
    staged = measure_sensitivity(model, batches, config, progress=False)
    assert len(captured) >= 10  # the layers not pinned by the first/last policy came through the stages
    monkeypatch.setattr(StagedRunner, "for_model", classmethod(lambda cls, *a, **k: (None, "off")))
    whole = measure_sensitivity(model, batches, config, progress=False)
    assert staged.layer_names == whole.layer_names
    done = ~np.isnan(whole.sensitivity)
    assert np.array_equal(done, ~np.isnan(staged.sensitivity)) and done.sum() >= 20
    assert np.allclose(staged.sensitivity[done], whole.sensitivity[done], rtol=1e-5, atol=1e-8)
