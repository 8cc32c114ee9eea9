"""scripts/bench_peers.py: argument parsing, same-time iteration counts, our reference rows and the tables.

Pure python: nothing here needs the peers' virtual environments.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from peers import report  # noqa: E402


def _bench_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "scripts" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parser_defaults_and_smoke_path():
    bp = _bench_peers()
    args = bp.build_parser().parse_args([])
    assert args.peers == ["aimet", "brevitas"]
    assert args.models == ["resnet20", "resnet56"]
    assert args.settings == ["W4A8", "W4A4"]
    assert (args.aimet_iterations, args.brevitas_iterations, args.calib) == (1000, 1000, 1000)
    assert args.limit is None and not args.same_time and not args.smoke
    assert bp.results_path(args).name == "peers.json"
    smoke = bp.build_parser().parse_args(["--smoke", "--settings", "w4a4", "--aimet-iterations", "10",
                                          "--limit", "500", "--threads", "1"])
    assert smoke.settings == ["W4A4"] and smoke.aimet_iterations == 10 and smoke.limit == 500
    assert bp.results_path(smoke).name == "peers_smoke.json"


@pytest.mark.parametrize("argv", [["--settings", "W4"], ["--settings", "X4A4"], ["--aimet-iterations", "0"],
                                  ["--peers", "nncf"], ["--limit", "-5"], ["--models", "resnet18"]])
def test_parser_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        _bench_peers().build_parser().parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_parse_setting():
    assert report.parse_setting("W4A8") == (4, 8)
    assert report.parse_setting("w2a4") == (2, 4)
    for bad in ("W4", "4A8", "WxA8", "W0A8", "W4A4A4"):
        with pytest.raises(ValueError, match="setting"):
            report.parse_setting(bad)


def test_iterations_for_time_fits_fixed_cost_and_slope():
    # 10 s fixed + 0.5 s per iteration: 200 s is reached at 380 iterations.
    probes = [(5, 12.5), (25, 22.5)]
    assert report.iterations_for_time(200.0, probes) == 380
    # Three noisy probes on the same line: least squares stays close.
    assert abs(report.iterations_for_time(200.0, [(5, 12.4), (15, 17.6), (25, 22.5)]) - 380) <= 8
    # One probe: all its time is taken as per-iteration cost (12.5 s / 5 = 2.5 s per iteration) -> errs low.
    assert report.iterations_for_time(200.0, [(5, 12.5)]) == 80
    # The fixed cost alone exceeds the target: the minimum, not a negative count.
    assert report.iterations_for_time(5.0, probes) == 1
    assert report.iterations_for_time(1e9, probes, maximum=5000) == 5000


@pytest.mark.parametrize("target,probes,match", [
    (100.0, [], "at least one"),
    (0.0, [(5, 1.0)], "target_seconds"),
    (100.0, [(5, 2.0), (5, 3.0)], "two different"),
    (100.0, [(5, 3.0), (25, 2.0)], "no positive time"),
    (100.0, [(0, 3.0)], "positive"),
])
def test_iterations_for_time_rejects_bad_probes(target, probes, match):
    with pytest.raises(ValueError, match=match):
        report.iterations_for_time(target, probes)


def test_merge_row_replaces_same_key_only():
    a = {"peer": "aimet", "model": "resnet20", "setting": "W4A4", "budget": "same-iterations", "top1": 1.0}
    b = {**a, "budget": "same-time", "top1": 2.0}
    rows = report.merge_row(report.merge_row([], a), b)
    assert len(rows) == 2
    rows = report.merge_row(rows, {**a, "top1": 3.0})
    assert sorted(r["top1"] for r in rows) == [2.0, 3.0]


def test_ours_rows_reads_advanced_rows_with_source_and_commit(tmp_path):
    core = [
        {"model": "resnet20", "method": "advanced", "setting": "W4A4", "top1": 90.93, "seconds": 226.5,
         "commit": "c88e9da", "load_average_1min": 1.06,
         "config": {"iterations": 200, "weight_range_method": "mse", "activation_range_method": "mse"}},
        {"model": "resnet20", "method": "light", "setting": "W4A4", "top1": 90.92, "seconds": 16.5},
        {"model": "resnet20", "method": "advanced", "setting": "W2A4", "top1": 88.56, "seconds": 212.1},
        {"model": "resnet20", "method": "advanced", "setting": "W4A8", "seconds": 1.0},  # no accuracy: skipped
    ]
    (tmp_path / "core_resnet20.json").write_text(json.dumps(core))
    rows = report.ours_rows(tmp_path, ["resnet20", "resnet56"], ["w4a4", "W4A8"], repo_root=tmp_path.parent)
    assert len(rows) == 1
    row = rows[0]
    assert (row["peer"], row["setting"], row["top1"], row["seconds"], row["iterations"]) == \
        ("hf_adaquant", "W4A4", 90.93, 226.5, 200)
    assert row["commit"] == "c88e9da"
    assert row["source"] == f"{tmp_path.name}/core_resnet20.json"
    assert row["range_method"] == "weights mse, activations mse"


def test_ours_rows_reads_tagged_ablation_files_and_labels_their_options(tmp_path):
    def core(top1, **config):
        return [{"model": "resnet20", "method": "advanced", "setting": "W4A4", "top1": top1, "seconds": 90.0,
                 "threads": 1, "config": {"iterations": 200, **config}}]

    (tmp_path / "core_resnet20_abl_layer.json").write_text(json.dumps(core(91.1, reconstruction="layer")))
    (tmp_path / "core_resnet20_abl_block_drop.json").write_text(
        json.dumps(core(91.4, reconstruction="block", activation_drop=0.5, weight_rounding="learned")))
    seeded = core(91.2, reconstruction="layer", seed=1)
    del seeded[0]["threads"]  # rows before bench_core recorded it: read from the run profile
    seeded[0]["profile"] = {"throughput": {"threads": 1}}
    (tmp_path / "core_resnet20_abl_layer_seed1.json").write_text(json.dumps(seeded))
    (tmp_path / "core_resnet20.json").write_text(json.dumps(core(90.9)))  # not asked for: not read
    rows = report.ours_rows(tmp_path, ["resnet20"], ["W4A4"],
                            tags=["_abl_layer", "_abl_block_drop", "_abl_layer_seed1", "_absent"])
    assert [(r["method"], r["top1"], r["threads"]) for r in rows] == [
        ("advanced pipeline (layer)", 91.1, 1),
        ("advanced pipeline (block + drop 0.5, learned rounding)", 91.4, 1),
        ("advanced pipeline (layer, seed 1)", 91.2, 1),
    ]
    assert [r["source"] for r in rows] == ["core_resnet20_abl_layer.json", "core_resnet20_abl_block_drop.json",
                                           "core_resnet20_abl_layer_seed1.json"]


def test_ours_rows_from_the_repository_results():
    rows = report.ours_rows(ROOT / "benchmarks" / "results", ["resnet20"], ["W4A4"], repo_root=ROOT)
    if not rows:
        pytest.skip("benchmarks/results/core_resnet20.json has no advanced W4A4 row")
    assert rows[0]["source"] == "benchmarks/results/core_resnet20.json"
    assert 10.0 < rows[0]["top1"] <= 100.0


def test_save_rows_writes_json_and_sorted_markdown(tmp_path):
    rows = [
        {"peer": "brevitas", "method": "learned round", "model": "resnet20", "setting": "W4A4",
         "budget": "same-iterations", "iterations": 10, "top1": 88.123, "seconds": 12.34, "threads": 1,
         "load_average_1min": 2.5, "peer_version": "0.13.4", "commit": "abc", "eval_images": 500},
        {"peer": "hf_adaquant", "method": "advanced pipeline", "model": "resnet20", "setting": "W4A4",
         "budget": "reference", "top1": 90.93, "seconds": 226.5, "source": "benchmarks/results/core_resnet20.json"},
        {"peer": "aimet", "method": "AdaRound", "model": "resnet20", "setting": "W4A4", "budget": "same-iterations",
         "iterations": 10, "top1": None, "seconds": 5.0},
    ]
    path = tmp_path / "out" / "peers_smoke.json"
    report.save_rows(rows, path, "SMOKE")
    assert json.loads(path.read_text()) == rows
    md = (tmp_path / "out" / "peers_smoke.md").read_text().splitlines()
    assert md[0] == "# SMOKE"
    body = [l for l in md if l.startswith("| resnet20")]
    assert [l.split(" | ")[2] for l in body] == ["hf_adaquant: advanced pipeline", "aimet: AdaRound",
                                                "brevitas: learned round"]
    assert "| 88.12 |" in body[2] and "| 12.3 |" in body[2] and "| 2.50 |" in body[2]
    assert "| — |" in body[1]  # missing accuracy shown as a dash, not "None"
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_save_row_merges_with_rows_already_on_disk(tmp_path):
    bp = _bench_peers()
    path = tmp_path / "peers.json"
    ours = [{"peer": "hf_adaquant", "model": "resnet20", "setting": "W4A4", "budget": "reference", "top1": 90.93}]
    aimet = {"peer": "aimet", "model": "resnet20", "setting": "W4A4", "budget": "same-iterations", "top1": 90.6}
    brevitas = {**aimet, "peer": "brevitas", "top1": 90.4}
    bp.save_row(path, "t", ours, aimet)
    bp.save_row(path, "t", ours, brevitas)  # a second run (or process) keeps the first one's row
    bp.save_row(path, "t", ours, {**aimet, "top1": 91.0})  # a rerun replaces its own row
    rows = json.loads(path.read_text())
    assert [(r["peer"], r["top1"]) for r in rows] == [("hf_adaquant", 90.93), ("brevitas", 90.4), ("aimet", 91.0)]


def test_same_time_run_probes_then_runs_at_the_matching_count(tmp_path, monkeypatch):
    bp = _bench_peers()
    calls = []

    def fake_worker(python, peer, model, setting, iterations, args, calib, test, evaluate=True):
        calls.append((iterations, evaluate))
        res = {"seconds": 10.0 + 0.5 * iterations, "iterations": iterations}  # 10 s fixed + 0.5 s/iteration
        if evaluate:
            res.update(top1=90.0, fp32_folded_top1=91.0, agreement_with_fp32=95.0)
        return res

    monkeypatch.setattr(bp, "run_worker", fake_worker)
    args = bp.build_parser().parse_args(["--same-time", "--peers", "aimet", "--probe-iterations", "5", "25"])
    ours = [{"peer": "hf_adaquant", "model": "resnet20", "setting": "W4A4", "budget": "reference",
             "seconds": 200.0, "threads": 2, "top1": 90.93}]
    path = tmp_path / "peers.json"
    bp.run_one(Path("python"), "aimet", "resnet20", "W4A4", args, tmp_path, tmp_path, ours, path, "t", "abc")
    assert calls == [(5, False), (25, False), (380, True)]
    row = json.loads(path.read_text())[-1]
    assert (row["budget"], row["iterations"], row["seconds"]) == ("same-time", 380, 200.0)
    assert row["same_time"]["target_seconds"] == 200.0
    with pytest.raises(RuntimeError, match="no timed row of ours"):
        bp.run_one(Path("python"), "aimet", "resnet56", "W4A4", args, tmp_path, tmp_path, ours, path, "t", "abc")
