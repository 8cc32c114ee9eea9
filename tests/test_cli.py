"""``hf-adaquant`` end to end on a tiny timm model: quantize -> evaluate -> push (stand-in Hub) -> reload."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hf_adaquant.cli import main
from hf_adaquant.data import normalize_cifar
from hf_adaquant.serialization import load_quantized

from hub_standin import LocalHubApi

TOKEN = "hf_CLItokenMustNotLeak9876543210zyxwv"


def _recipe(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "eval.npz", x=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 24).astype(np.int64))
    recipe = {
        "name": "tiny-test-resnet",
        "description": "timm test_resnet, random weights: mechanics only",
        "model": {"source": "timm", "name": "test_resnet", "pretrained": False, "kwargs": {"num_classes": 10}},
        "calibration": {"source": "synthetic", "shape": [3, 32, 32], "num_samples": 16, "batch_size": 8},
        "evaluation": {"task": "image-classification", "source": "cifar10_npz", "path": "eval.npz",
                       "batch_size": 10},
        "quantization": {"weight_bits": 4, "activation_bits": 8, "iterations": 5, "batch_size": 8,
                         "bias_tuning_steps": 2, "progress": False, "seed": 0},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(capsys, argv, **kwargs) -> tuple[int, str, str]:
    rc = main(argv, **kwargs)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_quantize_evaluate_push_reload(tmp_path, capsys, caplog, monkeypatch):
    recipe = _recipe(tmp_path)
    out_dir = tmp_path / "out" / "tiny-w4a8"
    caplog.set_level(logging.DEBUG)

    rc, stdout, _ = _run(capsys, ["quantize", "--recipe", str(recipe), "--output", str(out_dir),
                                  "--set", "quantization.iterations=3"])
    assert rc == 0
    summary = json.loads(stdout)
    files = {p.name for p in out_dir.iterdir()}
    assert {"config.json", "adaquant_model.safetensors", "eval_results.json", "recipe.yaml"} <= files
    assert not [p for p in out_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    qcfg = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert qcfg["iterations"] == 3 and qcfg["weight_bits"] == 4  # --set reached the run
    assert yaml.safe_load((out_dir / "recipe.yaml").read_text())["quantization"]["iterations"] == 3
    results = json.loads((out_dir / "eval_results.json").read_text())
    assert results["quantized"] == summary["quantized"] and set(results["fp32"]) == {"accuracy"}
    assert results["size"]["checkpoint_bytes"] == (out_dir / "adaquant_model.safetensors").stat().st_size
    assert results["size"]["checkpoint_bytes"] < 0.25 * results["size"]["fp32_bytes"]

    # the recorded accuracy is the checkpoint's, recomputed here independently
    with np.load(tmp_path / "eval.npz") as data:
        x, y = normalize_cifar(data["x"]), torch.as_tensor(data["y"])
    reloaded = load_quantized(out_dir)
    with torch.no_grad():
        expected = (reloaded(x).argmax(-1) == y).float().mean().item()
    assert results["quantized"]["accuracy"] == pytest.approx(expected)

    rc, stdout, _ = _run(capsys, ["evaluate", str(out_dir)])
    assert rc == 0 and json.loads(stdout) == results["quantized"]

    monkeypatch.setenv("TEST_HUB_TOKEN", TOKEN)
    api = LocalHubApi(tmp_path / "hub")
    rc, stdout, stderr = _run(capsys, ["push", str(out_dir), "--repo-id", "me/tiny-w4a8", "--private",
                                       "--token-env", "TEST_HUB_TOKEN"], hub_api=api)
    assert rc == 0 and json.loads(stdout)["url"].startswith("https://huggingface.co/me/tiny-w4a8/commit/")
    assert api.calls[0][1]["private"] is True and api.calls[1][1]["token"] == TOKEN
    repo = api.repo_dir("me/tiny-w4a8")
    readme = (repo / "README.md").read_text()
    assert f"{100 * results['quantized']['accuracy']:.2f}" in readme and "name: tiny-test-resnet" in readme
    uploaded = [p.read_bytes() for p in repo.rglob("*") if p.is_file()]
    assert all(TOKEN.encode() not in data for data in uploaded)
    assert TOKEN not in stdout + stderr + caplog.text

    from_hub = load_quantized(repo)
    with torch.no_grad():
        assert torch.equal(from_hub(x), reloaded(x))


def _assert_one_line_error(rc: int, stderr: str, command: str, fragment: str) -> None:
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"hf-adaquant {command}: error:"), stderr
    assert fragment in lines[0] and "Traceback" not in stderr


def test_bad_input_exits_with_one_line(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path)
    rc, _, err = _run(capsys, ["quantize", "--recipe", str(tmp_path / "nope.yaml"), "--output", str(tmp_path / "o")])
    _assert_one_line_error(rc, err, "quantize", "recipe file not found")
    rc, _, err = _run(capsys, ["quantize", "--recipe", str(recipe), "--output", str(tmp_path / "o"),
                               "--set", "quantization.wbits=3"])
    _assert_one_line_error(rc, err, "quantize", "unknown AdaQuantConfig fields ['wbits']")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    rc, _, err = _run(capsys, ["quantize", "--recipe", str(recipe), "--output", str(occupied)])
    _assert_one_line_error(rc, err, "quantize", "exists and is not empty")
    assert (occupied / "keep.txt").read_text() == "mine"
    rc, _, err = _run(capsys, ["evaluate", str(tmp_path)])
    _assert_one_line_error(rc, err, "evaluate", "has no recipe.yaml")
    rc, _, err = _run(capsys, ["evaluate", str(tmp_path), "--recipe", str(recipe)])
    _assert_one_line_error(rc, err, "evaluate", "config.json")
    monkeypatch.delenv("UNSET_TOKEN_VAR", raising=False)
    rc, _, err = _run(capsys, ["push", str(tmp_path), "--repo-id", "me/x", "--token-env", "UNSET_TOKEN_VAR"],
                      hub_api=LocalHubApi(tmp_path / "hub"))
    _assert_one_line_error(rc, err, "push", "UNSET_TOKEN_VAR is not set")
    rc, _, err = _run(capsys, ["push", str(tmp_path), "--repo-id", "me/x"], hub_api=LocalHubApi(tmp_path / "hub"))
    _assert_one_line_error(rc, err, "push", "config.json")
    with pytest.raises(SystemExit) as exc:  # argparse usage errors also exit 2
        main(["push", str(tmp_path)])
    assert exc.value.code == 2


def test_console_script_help():
    script = Path(sys.executable).parent / "hf-adaquant"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable} (pip install -e .)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for command in ("quantize", "evaluate", "push"):
        assert command in proc.stdout


# ---------------------------------------------------------------------------------- failures: one line, nothing lost
_PREFIX = "hf-adaquant quantize: error:"


def _no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def _patch(monkeypatch, name: str, value) -> None:
    """Replace ``name`` where the CLI looks it up (the recipes package, or cli itself if imported there)."""
    import hf_adaquant.cli as cli
    import hf_adaquant.recipes as recipes

    monkeypatch.setattr(recipes, name, value)
    monkeypatch.setattr(cli, name, value, raising=False)


def test_failed_evaluation_keeps_the_quantized_checkpoint(tmp_path, capsys, monkeypatch):
    """The evaluation used to run inside the staging folder: its failure deleted the finished checkpoint."""
    recipe = _recipe(tmp_path)
    out_dir = tmp_path / "out" / "tiny"

    class Exploding:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def __call__(self, models):
            raise RuntimeError("evaluation\nexploded")

    _patch(monkeypatch, "build_evaluator", Exploding)
    rc, stdout, err = _run(capsys, ["quantize", "--recipe", str(recipe), "--output", str(out_dir),
                                    "--set", "quantization.iterations=1"])
    assert rc == 3
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{_PREFIX} RuntimeError: evaluation exploded"), err
    assert "only the evaluation failed" in lines[0] and str(out_dir) in lines[0] and "Traceback" not in err
    assert json.loads(stdout)["evaluation_error"] == "RuntimeError: evaluation exploded"
    assert {"config.json", "adaquant_model.safetensors", "recipe.yaml"} <= {p.name for p in out_dir.iterdir()}
    assert not (out_dir / "eval_results.json").exists()
    assert _no_leftovers(out_dir.parent) == []
    with np.load(tmp_path / "eval.npz") as data:
        x = normalize_cifar(data["x"][:4])
    with torch.no_grad():
        assert torch.isfinite(load_quantized(out_dir)(x)).all()  # a complete, loadable checkpoint


def test_internal_error_is_one_line_with_its_own_exit_code(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path)
    out_dir = tmp_path / "out" / "tiny"
    monkeypatch.setenv("HF_ADAQUANT_TEST_FAIL_LAYER", "*")  # RuntimeError inside quantize(), on the first layer
    rc, stdout, err = _run(capsys, ["quantize", "--recipe", str(recipe), "--output", str(out_dir)])
    assert rc == 1 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{_PREFIX} RuntimeError: injected failure") and "--debug" in lines[0]
    assert not out_dir.exists()
    with pytest.raises(RuntimeError, match="injected failure"):  # --debug: the traceback
        main(["--debug", "quantize", "--recipe", str(recipe), "--output", str(out_dir)])


def test_keyboard_interrupt_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    _patch(monkeypatch, "build_model", interrupted)
    rc, _, err = _run(capsys, ["quantize", "--recipe", str(recipe), "--output", str(tmp_path / "o")])
    assert rc == 130
    assert err.strip().splitlines() == [f"{_PREFIX} KeyboardInterrupt: interrupted"]


def test_overwrite_replaces_a_file_and_leaves_nothing_behind(tmp_path, capsys):
    """--overwrite over a FILE used to leave '.name.old' (rmtree cannot remove a file, and errors were ignored)."""
    recipe = _recipe(tmp_path)
    target = tmp_path / "out" / "tiny.bin"
    target.parent.mkdir()
    target.write_text("an old file")
    rc, _, err = _run(capsys, ["quantize", "--recipe", str(recipe), "--output", str(target), "--no-eval",
                               "--set", "quantization.iterations=1"])
    _assert_one_line_error(rc, err, "quantize", "exists and is not empty")
    assert target.read_text() == "an old file"
    rc, stdout, _ = _run(capsys, ["quantize", "--recipe", str(recipe), "--output", str(target), "--no-eval",
                                  "--overwrite", "--set", "quantization.iterations=1"])
    assert rc == 0 and json.loads(stdout)["output"] == str(target)
    assert target.is_dir() and (target / "config.json").is_file()
    assert _no_leftovers(target.parent) == []
