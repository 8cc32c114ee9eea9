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

from tests.hub_standin import LocalHubApi

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
    from hf_adaquant.adaquant import layerwise

    def injected(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(layerwise, "optimize_layer", injected)  # RuntimeError inside quantize(), on the first layer
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


# ----------------------------------------------------------------------------------------- quantize without a recipe
def _image_folder(root: Path, n: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "calib_images"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_quantize_timm_dir_without_recipe(tmp_path, capsys):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    save_for_hf(model, str(tmp_path / "fp"), safe_serialization=True)
    images = _image_folder(tmp_path)
    out_dir = tmp_path / "q"
    rc, stdout, err = _run(capsys, ["quantize", "-m", str(tmp_path / "fp"), "--weights", "int4", "--activations",
                                    "int8", "--pipeline", "light", "--dataset", str(images), "--num-samples", "4",
                                    "--output", str(out_dir), "--set", "quantization.progress=false"])
    assert rc == 0, err
    qcfg = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    assert (qcfg["weight_bits"], qcfg["activation_bits"], qcfg["pipeline"]) == (4, 8, "light")
    recipe = yaml.safe_load((out_dir / "recipe.yaml").read_text())  # what a recipe would have said
    assert recipe["model"]["source"] == "timm" and recipe["model"]["name"] == f"local-dir:{(tmp_path / 'fp').resolve()}"
    assert recipe["calibration"] == {"source": "hf_image_dataset", "name": str(images.resolve()), "split": "train",
                                     "config": None, "streaming": False, "num_samples": 4, "batch_size": 32}
    assert json.loads(stdout)["recipe"] == "fp-w4a8"
    reloaded = load_quantized(out_dir)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert reloaded(x).shape == (2, 10)

    # the same run from the recipe it saved gives the same checkpoint: recipes keep working
    rc, _, err = _run(capsys, ["quantize", "--recipe", str(out_dir / "recipe.yaml"), "--output",
                               str(tmp_path / "q2")])
    assert rc == 0, err
    again = load_quantized(tmp_path / "q2")
    with torch.no_grad():
        assert torch.equal(again(x), reloaded(x))


def test_quantize_transformers_dir_with_texts_passes_revision_and_remote_code(tmp_path, capsys, monkeypatch):
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, vocab_size=len(vocab), num_labels=2,
                                             max_position_embeddings=128)).save_pretrained(tmp_path / "fp")
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "fp")
    rng = np.random.default_rng(0)
    texts = tmp_path / "texts.jsonl"
    texts.write_text("\n".join(json.dumps({"text": " ".join(f"w{i}" for i in rng.integers(0, 40, 8))})
                               for _ in range(12)))
    seen: list[dict] = []
    real = transformers.AutoModelForSequenceClassification.from_pretrained.__func__

    def spy(cls, name, **kwargs):
        seen.append(dict(kwargs))
        kwargs.pop("revision", None)  # a local folder has no revisions; the value reached the loader
        return real(cls, name, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", classmethod(spy))
    rc, _, err = _run(capsys, ["quantize", "-m", str(tmp_path / "fp"), "--dataset", str(texts), "--num-samples",
                               "8", "--weights", "8", "--activations", "none", "--pipeline", "light", "--revision",
                               "v2", "--output", str(tmp_path / "q"), "--set", "quantization.progress=false"])
    assert rc == 0, err
    assert seen[0]["revision"] == "v2" and seen[0]["trust_remote_code"] is False  # off by default
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qcfg["weight_bits"] == 8 and qcfg["activation_bits"] is None
    recipe = yaml.safe_load((tmp_path / "q" / "recipe.yaml").read_text())
    assert recipe["model"]["task"] == "sequence-classification"  # from config.json's architectures
    assert recipe["calibration"]["source"] == "text"
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "q")
    assert reloaded.config.quantization_config.quant_method == "adaquant"

    seen.clear()
    rc, _, err = _run(capsys, ["quantize", "-m", str(tmp_path / "fp"), "--dataset", str(texts), "--num-samples",
                               "4", "--pipeline", "light", "--trust-remote-code", "--output", str(tmp_path / "q3"),
                               "--set", "quantization.progress=false"])
    assert rc == 0, err
    assert seen[0]["trust_remote_code"] is True


def test_quantize_without_recipe_bad_input(tmp_path, capsys):
    rc, _, err = _run(capsys, ["quantize", "--output", str(tmp_path / "o")])
    _assert_one_line_error(rc, err, "quantize", "either --recipe or -m/--model")
    rc, _, err = _run(capsys, ["quantize", "-m", "timm/resnet18.a1_in1k", "--output", str(tmp_path / "o")])
    _assert_one_line_error(rc, err, "quantize", "--dataset")
    rc, _, err = _run(capsys, ["quantize", "-m", "timm/resnet18.a1_in1k", "--dataset", "x", "--weights", "int",
                               "--output", str(tmp_path / "o")])
    _assert_one_line_error(rc, err, "quantize", "--weights must look like int4")
    rc, _, err = _run(capsys, ["quantize", "-m", "someone/bert", "--dataset", "x", "--output", str(tmp_path / "o")])
    _assert_one_line_error(rc, err, "quantize", "pass --task")


def test_parse_bits():
    from hf_adaquant.recipes.from_model import parse_bits

    assert [parse_bits(t, "w") for t in ("int4", "4", "w2", "a8", "uint8", "none", "FP32")] == [4, 4, 2, 8, 8, None,
                                                                                                None]


# ---------------------------------------------------------------------------------------------- optimum-cli adaquant
def _optimum_cli() -> list[str]:
    script = Path(sys.executable).parent / "optimum-cli"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "optimum.commands.optimum_cli"]


def test_optimum_cli_lists_adaquant_in_a_fresh_process(tmp_path):
    # run outside the checkout: the command must come from the installed distribution, not from the cwd
    root = subprocess.run(_optimum_cli() + ["--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert root.returncode == 0 and "adaquant" in root.stdout
    top = subprocess.run(_optimum_cli() + ["adaquant", "--help"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300)
    assert top.returncode == 0, top.stderr
    assert "quantize" in top.stdout
    sub = subprocess.run(_optimum_cli() + ["adaquant", "quantize", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert sub.returncode == 0, sub.stderr
    for option in ("--model", "--weights", "--activations", "--dataset", "--num-samples", "--trust-remote-code",
                   "output"):
        assert option in sub.stdout


def test_optimum_cli_start_up_does_not_import_hf_adaquant(tmp_path):
    # optimum-cli builds every plug-in's parser on each start: ours must not load hf_adaquant/torch (seconds)
    code = ("import sys; sys.argv = ['optimum-cli', '--help']\n"
            "from optimum.commands.optimum_cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in ('hf_adaquant', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "adaquant" in out.stdout and "LOADED []" in out.stdout


def test_optimum_cli_adaquant_quantize_runs(tmp_path, capsys, monkeypatch):
    import timm
    from optimum.commands import optimum_cli
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_resnet", pretrained=False, num_classes=10).eval(), str(tmp_path / "fp"),
                safe_serialization=True)
    images = _image_folder(tmp_path, 4)
    monkeypatch.setattr(sys, "argv", ["optimum-cli", "adaquant", "quantize", "-m", str(tmp_path / "fp"),
                                      "--weights", "int4", "--activations", "int8", "--pipeline", "light",
                                      "--dataset", str(images), "--num-samples", "4",
                                      "--set", "quantization.progress=false", str(tmp_path / "q")])
    optimum_cli.main()  # returns normally on success (a failure exits with hf-adaquant's status)
    assert json.loads(capsys.readouterr().out)["output"] == str(tmp_path / "q")
    qcfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qcfg["weight_bits"], qcfg["activation_bits"]) == (4, 8)
    monkeypatch.setattr(sys, "argv", ["optimum-cli", "adaquant", "quantize", "-m", str(tmp_path / "fp"),
                                      str(tmp_path / "q2")])
    with pytest.raises(SystemExit) as exc:
        optimum_cli.main()
    assert exc.value.code == 2 and "--dataset" in capsys.readouterr().err
