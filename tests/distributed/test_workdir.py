"""Distributed and resumable AdaQuant: torchrun ranks equal one process, killed runs resume, failures stop all.

The multi-process tests launch this file as a script (``__main__`` below is the worker) with
``torchrun --standalone --nproc_per_node 2`` on CPU (gloo, one thread per process).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.conftest helpers, also when run by torchrun

from tests.conftest import TINY_CNN_LAYERS, fast_config, make_batches, make_tiny_cnn  # noqa: E402

from hf_adaquant import quantize  # noqa: E402
from hf_adaquant.adaquant import layerwise  # noqa: E402
from hf_adaquant.adaquant.staged import StagedRunner  # noqa: E402
from hf_adaquant.distributed import (WorkDir, WorkDirCorruptError, WorkDirMismatchError, assign_layers,  # noqa: E402
                                     run_fingerprint, shard_batches)

WORKER = Path(__file__).resolve()
ITERATIONS = 6


def _config(variant: str, **changes: object):
    return fast_config(**{"variant": variant, "iterations": ITERATIONS, "bias_tuning_steps": 4, **changes})


def _data() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    batches = make_batches(4, 8)
    return make_tiny_cnn(0, batches), batches


def _resnet_data() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    from hf_adaquant.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    return CifarResNet((1, 1, 1)).eval(), make_batches(2, 8)


def _count_optimised(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = layerwise.optimize_layer

    def spy(layer, cache, config, generator, name="", **kwargs):
        seen.append(name)
        return real(layer, cache, config, generator, name, **kwargs)

    monkeypatch.setattr(layerwise, "optimize_layer", spy)
    return seen


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_ADAQUANT_TEST_THREADS="1")
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def _torchrun(args: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), *args]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (max |diff| {(a[k].float() - b[k].float()).abs().max()})"


def _mse(layers: list[dict]) -> list[tuple[float, float]]:
    return [(l["mse_before"], l["mse_after"]) for l in layers]


# ------------------------------------------------------------------------------------------ worker


def _worker(argv: list[str]) -> None:
    """One rank: quantize the tiny CNN with each requested variant and save what it got."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", nargs="+", default=["parallel"])
    parser.add_argument("--work-dir")
    parser.add_argument("--kill-after-layers", type=int, help="SIGKILL this process after N checkpointed layers")
    parser.add_argument("--fail-rank", type=int, help="this rank raises in its first layer job")
    parser.add_argument("--resnet-staged", nargs="*", choices=["on", "off"], default=[],
                        help="also quantize a CIFAR ResNet (sequential) with staged propagation on / off")
    args = parser.parse_args(argv)
    from hf_adaquant.distributed import get_context

    if args.kill_after_layers:
        _kill_after_saving(args.kill_after_layers)

    rank = get_context().rank
    jobs = [("tiny", v, "on") for v in args.variants] + [("resnet", "sequential", s) for s in args.resnet_staged]
    for model_name, variant, staged in jobs:
        seen: list[str] = []
        real = layerwise.optimize_layer

        def spy(layer, cache, config, generator, name="", **kwargs):
            if args.fail_rank == rank:
                raise RuntimeError(f"injected failure on layer {name!r}")
            seen.append(name)
            return real(layer, cache, config, generator, name, **kwargs)

        layerwise.optimize_layer = spy
        staged_captures: list[str] = []
        real_capture = StagedRunner.capture
        StagedRunner.capture = lambda self, name: staged_captures.append(name) or real_capture(self, name)
        model, batches = _data() if model_name == "tiny" else _resnet_data()
        config = _config(variant, staged_propagation=staged == "on")
        if model_name == "resnet":  # the AdaQuant phase is what differs: keep the rest of the pipeline short
            config = config.replace(iterations=3, bn_tuning=False, bias_tuning=False)
        qmodel = quantize(model, batches, config, work_dir=args.work_dir)
        layerwise.optimize_layer = real
        StagedRunner.capture = real_capture
        suffix = "" if model_name == "tiny" else f"_resnet_staged_{staged}"
        torch.save({"state": qmodel.state_dict(), "layers": qmodel.hf_adaquant_report.layers, "optimised": seen,
                    "staged_captures": staged_captures},
                   Path(args.out) / f"{variant}{suffix}_rank{rank}.pt")


def _kill_after_saving(num_layers: int) -> None:
    """Make this process die by SIGKILL right after its ``num_layers``-th layer checkpoint is written."""
    real, saved = WorkDir.save_layer, []

    def save_then_maybe_die(self, name, layer, report):
        real(self, name, layer, report)
        saved.append(name)
        if len(saved) >= num_layers:
            os.kill(os.getpid(), signal.SIGKILL)

    WorkDir.save_layer = save_then_maybe_die


# ----------------------------------------------------------------------------------- unit: schedule


def test_assign_layers_balances_cost_and_is_deterministic() -> None:
    costs = {"a": 10.0, "b": 7.0, "c": 6.0, "d": 5.0, "e": 4.0, "f": 1.0}
    order = list(costs)
    parts = assign_layers(costs, order, 2)
    assert sorted(sum(parts, [])) == sorted(order)
    loads = [sum(costs[n] for n in p) for p in parts]
    assert abs(loads[0] - loads[1]) <= 2.0  # LPT: 10+5+1+... vs 7+6+...; contiguous halves would be 23 vs 10
    assert all(p == sorted(p, key=order.index) for p in parts)  # each rank runs its layers in model order
    assert assign_layers(costs, order, 2) == parts
    assert assign_layers(costs, order, 1) == [order]


def test_shard_batches_covers_every_sample_once() -> None:
    batches = [torch.arange(5.0), torch.arange(5.0, 8.0)]
    shards = [shard_batches(batches, r, 2) for r in range(2)]
    got = torch.cat([torch.cat(s) for s in shards]).sort().values
    assert torch.equal(got, torch.arange(8.0))
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        shard_batches([torch.zeros(2)], 0, 3)
    # batches of one sample: whole batches are dealt out, still every sample exactly once
    singles = [torch.tensor([float(i)]) for i in range(5)]
    shards = [shard_batches(singles, r, 2) for r in range(2)]
    got = torch.cat([torch.cat(s) for s in shards]).sort().values
    assert torch.equal(got, torch.arange(5.0)) and all(shards)
    with pytest.raises(ValueError, match="use larger batches"):
        shard_batches([torch.zeros(2), torch.zeros(2)], 0, 3)


# -------------------------------------------------------------------------------- resume / work dir


def test_mismatched_work_dir_is_rejected_naming_the_difference(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = _data()
    work = tmp_path / "work"
    first = quantize(model, batches, _config("parallel", iterations=1, bias_tuning=False, bn_tuning=False),
                     work_dir=work)
    assert len(list((work / "layers").glob("*.safetensors"))) == len(TINY_CNN_LAYERS)
    # Same run again: everything comes from the work dir, nothing is optimised, same model.
    seen = _count_optimised(monkeypatch)
    again = quantize(model, batches, _config("parallel", iterations=1, bias_tuning=False, bn_tuning=False),
                     work_dir=work)
    assert seen == []
    _assert_same_state(again.state_dict(), first.state_dict())
    with pytest.raises(WorkDirMismatchError, match=r"config\.iterations: 1 \(work dir\) != 2 \(this run\)"):
        quantize(model, batches, _config("parallel", iterations=2, bias_tuning=False, bn_tuning=False),
                 work_dir=work)
    other = [b + 0.01 for b in batches]
    with pytest.raises(WorkDirMismatchError, match="calibration data"):
        quantize(model, other, _config("parallel", iterations=1, bias_tuning=False, bn_tuning=False),
                 work_dir=work)
    # A directory that is not ours is not written into.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(WorkDirMismatchError, match="not an hf_adaquant work dir"):
        quantize(model, batches, _config("parallel", iterations=1), work_dir=foreign)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))


def _edit_metadata(path: Path, **changes: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**metadata, **changes})


@pytest.mark.parametrize("damage, message", [
    ("flipped_byte", r"does not match its SHA-256 digest"),
    ("truncated", r"cannot be read \(SafetensorError"),
    ("empty", r"cannot be read"),
    ("edited_report", r"does not match its SHA-256 digest"),
    ("bad_json", r"does not match its SHA-256 digest"),
    ("other_layer", r"it holds layer 'conv1'"),
])
def test_damaged_layer_file_is_refused_naming_file_and_layer(damage: str, message: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A work-dir layer file that was damaged or edited is never loaded: the error names the file, the layer and
    the remedy; deleting the file recomputes that layer, bitwise as in the first run."""
    model, batches = _data()
    config = _config("parallel", iterations=1, bias_tuning=False, bn_tuning=False)
    work = tmp_path / "work"
    first = quantize(model, batches, config, work_dir=work)
    file = work / "layers" / "conv2.safetensors"
    if damage == "flipped_byte":
        _flip_last_byte(file)
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    elif damage == "empty":
        file.write_bytes(b"")
    elif damage == "edited_report":
        report = json.loads(json.loads(json.dumps({"r": _read_metadata(file)["report"]}))["r"])
        _edit_metadata(file, report=json.dumps({**report, "mse_after": 0.0}))
    elif damage == "bad_json":
        _edit_metadata(file, attributes="{not json")
    else:
        file.write_bytes((work / "layers" / "conv1.safetensors").read_bytes())
    with pytest.raises(WorkDirCorruptError, match=rf"{file}.* of layer 'conv2' is unusable: .*{message}.*"
                                                  r"Delete this file to recompute that layer"):
        quantize(model, batches, config, work_dir=work)
    file.unlink()
    seen = _count_optimised(monkeypatch)
    again = quantize(model, batches, config, work_dir=work)
    assert seen == ["conv2"]
    _assert_same_state(again.state_dict(), first.state_dict())


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_unreadable_fingerprint_and_restart_without_finished_layers(tmp_path: Path) -> None:
    model, batches = _data()
    config = _config("parallel", iterations=1, bias_tuning=False, bn_tuning=False)
    work = tmp_path / "work"
    quantize(model, batches, config, work_dir=work)
    fingerprint = work / "fingerprint.json"
    fingerprint.write_text(fingerprint.read_text()[:40])
    with pytest.raises(WorkDirCorruptError, match=r"fingerprint.json is not valid JSON.*Delete the work dir"):
        quantize(model, batches, config, work_dir=work)
    # No finished layer: nothing to lose, the work dir is taken over by the new run (damaged or other fingerprint).
    for layer_file in (work / "layers").glob("*.safetensors"):
        layer_file.unlink()
    quantize(model, batches, config, work_dir=work)
    assert json.loads(fingerprint.read_text())["config"]["iterations"] == 1
    for layer_file in (work / "layers").glob("*.safetensors"):
        layer_file.unlink()
    quantize(model, batches, config.replace(iterations=2), work_dir=work)
    assert json.loads(fingerprint.read_text())["config"]["iterations"] == 2


def test_fingerprint_records_processes_only_for_sequential() -> None:
    from hf_adaquant import prepare_model

    model, batches = _data()
    config = _config("sequential")
    prepared = prepare_model(model, batches[0], config)
    names = list(prepared.plan)
    fp1 = run_fingerprint(config, prepared.qmodel, prepared.fp_model, names, batches, 1)
    fp2 = run_fingerprint(config, prepared.qmodel, prepared.fp_model, names, batches, 2)
    assert fp1["num_processes"] == 1 and fp1 != fp2
    assert fp1 == run_fingerprint(config.replace(progress=True), prepared.qmodel, prepared.fp_model, names,
                                  batches, 1)  # progress bars do not change results
    changed = copy.deepcopy(prepared.fp_model)
    with torch.no_grad():
        changed.conv1.weight[0, 0, 0, 0] += 1e-3
    assert run_fingerprint(config, prepared.qmodel, changed, names, batches, 1)["model_weights"] != fp1["model_weights"]


# A valid value other than the default for some fields of every section (the fingerprint must react to, or ignore,
# any change: the values need not make a sensible run).
_CHANGES = {
    "weight_bits": 3, "activation_bits": None, "first_last_bits": None, "embedding_bits": None, "include": ["conv*"],
    "layer_bits": {"conv1": (8, 8)}, "weight_symmetric": True, "activation_range_method": "minmax",
    "pipeline": "light", "variant": "parallel", "iterations": 7, "batch_size": 3, "lr_weight": 0.5,
    "weight_deviation_limit": 2.0, "weight_rounding": "learned", "reconstruction": "block", "activation_drop": 0.5,
    "lr_rounding": 0.5, "rounding_regularization": 0.5, "bn_tuning": False, "bias_tuning": False,
    "bias_tuning_steps": 3, "bias_tuning_lr": 0.5, "bias_correction_method": "per_layer", "size_budget": 0.5,
    "candidate_weight_bits": [4], "sensitivity_criterion": "mse", "pinned_layers": {"fc": (8, None)},
    "max_calibration_samples": 5, "cache_dtype": "float32", "max_cache_bytes": 99, "staged_propagation": False,
    "seed": 5, "progress": True, "checkpoint_layout": {"version": 1}, "dataset": "glue", "num_samples": 5,
    "text_column": "sentence"}


def _fingerprint_parts() -> tuple:
    from hf_adaquant import prepare_model

    model, batches = _data()
    config = _config("sequential")
    prepared = prepare_model(model, batches[0], config)
    return config, prepared, list(prepared.plan), batches


@pytest.mark.parametrize("name", sorted(_CHANGES))
def test_fingerprint_holds_exactly_the_fields_the_layer_phase_reads(name: str) -> None:
    """A field the per-layer phase reads (ADAQUANT_LAYERS: scheme, optimiser, seed, cache precision) changes the
    work dir's fingerprint; any other (tuning, allocation, quantize-on-load, progress...) does not."""
    from hf_adaquant.config.stages import ADAQUANT_LAYERS

    config, prepared, names, batches = _fingerprint_parts()
    changed = config.replace()
    setattr(changed, name, _CHANGES[name])  # unvalidated: the fingerprint must react to any change
    before = run_fingerprint(config, prepared.qmodel, prepared.fp_model, names, batches, 1)
    after = run_fingerprint(changed, prepared.qmodel, prepared.fp_model, names, batches, 1)
    assert sorted(before["config"]) == sorted(ADAQUANT_LAYERS.reads)
    if name in ADAQUANT_LAYERS.reads:
        assert after != before, f"{name} is read by the per-layer phase but not in the work-dir fingerprint"
    else:
        assert after == before, f"{name} is not read by the per-layer phase but changes the work-dir fingerprint"


def test_every_scheme_and_optimizer_field_is_in_the_fingerprint() -> None:
    from hf_adaquant.config import OptimizerConfig, SchemeConfig
    from hf_adaquant.config.stages import ADAQUANT_LAYERS

    assert set(SchemeConfig.field_names()) | set(OptimizerConfig.field_names()) <= set(ADAQUANT_LAYERS.reads)
    for section in ("tuning", "allocation", "saved", "on_load"):
        assert not set(ADAQUANT_LAYERS.reads) & set(getattr(_config("parallel"), section).field_names()), section


def test_resume_accepted_when_only_unread_fields_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches = _data()
    work = tmp_path / "work"
    config = _config("parallel", iterations=1, bias_tuning=False, bn_tuning=False)
    quantize(model, batches, config, work_dir=work)
    seen = _count_optimised(monkeypatch)
    # bias tuning, BN tuning, quantize-on-load and progress fields: the finished layers are reused as they are
    quantize(model, batches, config.replace(bias_tuning=True, bias_tuning_steps=2, bn_tuning=True, num_samples=3,
                                            dataset="glue", progress=False), work_dir=work)
    assert seen == []
    with pytest.raises(WorkDirMismatchError, match=r"config\.lr_weight: 0\.001 \(work dir\) != 0\.5"):
        quantize(model, batches, config.replace(lr_weight=0.5), work_dir=work)
    with pytest.raises(WorkDirMismatchError, match=r"config\.weight_symmetric: False \(work dir\) != True"):
        quantize(model, batches, config.replace(weight_symmetric=True), work_dir=work)


def test_work_dir_fingerprinted_with_every_field_still_resumes(tmp_path: Path) -> None:
    """Work dirs written when the fingerprint held the whole config: fields it no longer holds are not compared."""
    config, prepared, names, batches = _fingerprint_parts()
    fingerprint = run_fingerprint(config, prepared.qmodel, prepared.fp_model, names, batches, 1)
    old = json.loads(json.dumps({**fingerprint, "config": {**config.to_dict(), **fingerprint["config"]}}))
    work = WorkDir(tmp_path / "work")
    work.prepare(old)
    work.save_layer(names[0], prepared.qmodel.get_submodule(names[0]), {})
    work.prepare(run_fingerprint(config.replace(bias_tuning_steps=3), prepared.qmodel, prepared.fp_model, names,
                                 batches, 1))  # accepted
    with pytest.raises(WorkDirMismatchError, match=r"config\.iterations"):
        work.prepare(run_fingerprint(config.replace(iterations=1), prepared.qmodel, prepared.fp_model, names,
                                     batches, 1))


@pytest.mark.parametrize("variant, changes", [("parallel", {}), ("sequential", {}),
                                              ("sequential", {"reconstruction": "block"})])
def test_the_layer_phase_reads_only_declared_fields(variant: str, changes: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded reads of prepare_model + run_adaquant lie inside ADAQUANT_LAYERS (its fingerprint fields plus the
    route fields that do not change results): a field the phase starts reading undeclared fails here."""
    from hf_adaquant import prepare_model
    from hf_adaquant.adaquant import run_adaquant
    from hf_adaquant.config.stages import ADAQUANT_LAYERS

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.config_reads import record_config_reads

    model, batches = _resnet_data() if changes else _data()
    config = _config(variant, iterations=1, **changes)
    reads = record_config_reads(monkeypatch)
    prepared = prepare_model(model, batches[0], config)
    run_adaquant(prepared.qmodel, prepared.fp_model, list(prepared.plan), batches, config)
    declared = set(ADAQUANT_LAYERS.reads + ADAQUANT_LAYERS.route)
    assert reads, "nothing recorded: the recorder does not see the config's reads"
    assert reads <= declared, f"read but not declared in hf_adaquant.config.stages: {sorted(reads - declared)}"


@pytest.mark.parametrize("variant", ["parallel", "sequential"])
def test_killed_run_resumes_to_the_uninterrupted_result(variant: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL after 2 checkpointed layers, then resume: same model as one uninterrupted run, finished layers
    are not optimised again (for the sequential variant the restored prefix feeds the remaining layers)."""
    model, batches = _data()
    reference = quantize(model, batches, _config(variant))
    work = tmp_path / "work"
    killed = subprocess.run([sys.executable, str(WORKER), "--out", str(tmp_path), "--variants", variant,
                             "--work-dir", str(work), "--kill-after-layers", "2"], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / f"{variant}_rank0.pt").exists()
    assert len(list((work / "layers").glob("*.safetensors"))) == 2
    seen = _count_optimised(monkeypatch)
    resumed = quantize(model, batches, _config(variant), work_dir=work)
    assert seen == TINY_CNN_LAYERS[2:]
    _assert_same_state(resumed.state_dict(), reference.state_dict())
    assert _mse(resumed.hf_adaquant_report.layers) == _mse(reference.hf_adaquant_report.layers)


# ------------------------------------------------------------------------------------ multi-process


def _check_staged_data_parallel(out: Path) -> None:
    """Sequential variant on a CIFAR ResNet under 2 ranks: staged propagation runs on each rank's shard and gives
    the model that whole-model captures give with the same shards (both ranks the same)."""
    got = {(s, r): torch.load(out / f"sequential_resnet_staged_{s}_rank{r}.pt") for s in ("on", "off")
           for r in range(2)}
    _assert_same_state(got["on", 0]["state"], got["on", 1]["state"])
    assert got["on", 0]["optimised"] == got["off", 0]["optimised"] and len(got["on", 0]["optimised"]) == 8
    assert got["on", 1]["staged_captures"] == got["on", 1]["optimised"] and not got["off", 1]["staged_captures"]
    on, off = got["on", 0]["state"], got["off", 0]["state"]
    for k in on:
        assert torch.allclose(on[k].float(), off[k].float(), atol=1e-6), k
    flat = {s: [v for pair in _mse(got[s, 0]["layers"]) for v in pair] for s in ("on", "off")}
    assert flat["on"] == pytest.approx(flat["off"], rel=1e-5, abs=1e-9)


def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    """torchrun, 2 CPU ranks: the parallel variant splits the layers and every rank returns bitwise the
    1-process model; the sequential variant runs data-parallel (not bitwise: other mini-batches) and both
    ranks still return the same model, of comparable quality."""
    result = _torchrun(["--out", str(tmp_path), "--variants", "parallel", "sequential", "--resnet-staged", "on",
                        "off"], timeout=200)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_staged_data_parallel(tmp_path)
    model, batches = _data()
    ref = {v: quantize(model, batches, _config(v)) for v in ("parallel", "sequential")}
    par = [torch.load(tmp_path / f"parallel_rank{r}.pt") for r in range(2)]
    for got in par:
        _assert_same_state(got["state"], ref["parallel"].state_dict())
        assert _mse(got["layers"]) == _mse(ref["parallel"].hf_adaquant_report.layers)
    assert sorted(par[0]["optimised"] + par[1]["optimised"]) == sorted(TINY_CNN_LAYERS)
    assert par[0]["optimised"] and par[1]["optimised"]  # both ranks worked
    seq = [torch.load(tmp_path / f"sequential_rank{r}.pt") for r in range(2)]
    _assert_same_state(seq[0]["state"], seq[1]["state"])
    assert seq[0]["optimised"] == seq[1]["optimised"] == TINY_CNN_LAYERS  # every rank on every layer
    ref_layers = ref["sequential"].hf_adaquant_report.layers
    for got, want in zip(seq[0]["layers"], ref_layers):
        assert got["num_samples"] == want["num_samples"] == 32  # statistics over all shards
        assert got["mse_after"] <= got["mse_before"]
        assert got["mse_after"] < 2 * want["mse_after"] + 1e-6, (got, want)


@pytest.mark.parametrize("variant", ["parallel"])
def test_failure_on_one_rank_stops_all_ranks_promptly(variant: str, tmp_path: Path) -> None:
    start = time.monotonic()
    result = _torchrun(["--out", str(tmp_path), "--variants", variant, "--fail-rank", "1"], timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 90, f"took {elapsed:.0f} s: ranks waited for a timeout"
    out = result.stdout + result.stderr
    assert "injected failure" in out
    assert "rank 0 stops because rank 1 failed" in out, out[-4000:]
    assert not list(tmp_path.glob("*.pt"))


if __name__ == "__main__":
    _worker(sys.argv[1:])
