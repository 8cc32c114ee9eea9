"""Hub publishing: model card content, staging (the checkpoint folder is never modified), token hygiene, reload.

No network: an ``HfApi`` stand-in (``tests/hub_standin.py``) copies uploads into a temp "hub" folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from hf_adaquant import AdaQuantConfig, quantize
from hf_adaquant.hub import build_model_card, layer_bits_from_config, push_to_hub, read_checkpoint_info
from hf_adaquant.serialization import load_quantized, save_quantized

from tests.hub_standin import LocalHubApi

TOKEN = "hf_TESTTOKENdoNotLeak0123456789abcdef"
EVAL_RESULTS = {"task": "image-classification",
                "dataset": {"name": "synthetic-32px", "type": "synthetic", "split": "test", "num_samples": 64},
                "fp32": {"accuracy": 0.8125}, "quantized": {"accuracy": 0.796875},
                "size": {"fp32_bytes": 1_490_472}}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, torch.Tensor]:
    """A quantized timm ``test_resnet`` saved with ``save_quantized`` (+ inputs to compare outputs on)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    config = AdaQuantConfig(weight_bits=4, activation_bits=8, iterations=3, batch_size=8, bias_tuning_steps=2,
                            progress=False, seed=0)
    qmodel = quantize(model, batches, config)
    save_dir = save_quantized(qmodel, tmp_path_factory.mktemp("ckpt") / "test_resnet-w4a8")
    return save_dir, qmodel, torch.randn(4, 3, 32, 32, generator=g)


def test_push_uploads_card_and_checkpoint_that_reloads_identically(checkpoint, tmp_path, caplog, capsys):
    save_dir, qmodel, x = checkpoint
    before = _snapshot(save_dir)
    api = LocalHubApi(tmp_path / "hub")
    caplog.set_level(logging.DEBUG)
    result = push_to_hub(save_dir, "someone/test-resnet-w4a8", api=api, token=TOKEN, private=True,
                         eval_results=EVAL_RESULTS, base_model="timm/test_resnet.r160_in1k")

    # one create_repo(exist_ok=True) then one create_commit, token handed to the API (and nowhere else)
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][1]["exist_ok"] is True and api.calls[0][1]["private"] is True
    assert api.calls[1][1]["token"] == TOKEN and api.calls[1][1]["create_pr"] is False
    assert result.commit_url.endswith("/commit/" + "1".zfill(40))

    repo = api.repo_dir("someone/test-resnet-w4a8")
    uploaded = _snapshot(repo)
    assert set(uploaded) == set(before) | {"README.md"}
    assert all(uploaded[name] == data for name, data in before.items())
    assert _snapshot(save_dir) == before  # the checkpoint folder is untouched: no README written into it

    card = ModelCard.load(repo / "README.md")
    assert card.data.base_model == "timm/test_resnet.r160_in1k"
    assert card.data.library_name == "hf-adaquant" and "w4a8" in card.data.tags
    values = {(r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert values[("accuracy", "top-1 accuracy (W4A8)")] == pytest.approx(0.796875)
    assert values[("accuracy", "top-1 accuracy (FP32 reference)")] == pytest.approx(0.8125)
    text = card.text
    assert "| top-1 accuracy (%) | 81.25 | 79.69 | -1.56 |" in text
    layers = json.loads((save_dir / "config.json").read_text())["quantization_config"]["checkpoint_layout"]["layers"]
    for name, desc in layers.items():
        assert f"| `{name}` | {desc['weight_bits']} | {desc['activation_bits']} |" in text
    ckpt_bytes = (save_dir / "adaquant_model.safetensors").stat().st_size
    assert f"{ckpt_bytes / 1_490_472:.3f}×" in text
    assert 'import hf_adaquant' in text and 'load_quantized("someone/test-resnet-w4a8")' in text

    # the token is nowhere: uploaded files, logs, stdout/stderr
    out = capsys.readouterr()
    assert all(TOKEN.encode() not in data for data in uploaded.values())
    assert TOKEN not in caplog.text and TOKEN not in out.out + out.err

    reloaded = load_quantized(repo)
    with torch.no_grad():
        assert torch.equal(reloaded(x), qmodel(x))


def test_push_reads_side_cars_and_keeps_user_readme_out_of_save_dir(checkpoint, tmp_path):
    src, _, _ = checkpoint
    save_dir = tmp_path / "ckpt"
    save_dir.mkdir()
    for p in src.iterdir():
        (save_dir / p.name).write_bytes(p.read_bytes())
    (save_dir / "README.md").write_text("my own notes\n")
    (save_dir / "eval_results.json").write_text(json.dumps(EVAL_RESULTS))
    (save_dir / "recipe.yaml").write_text("name: tiny-recipe\nquantization: {weight_bits: 4}\n")
    (save_dir / ".cache").mkdir()
    (save_dir / ".cache" / "junk").write_text("x")
    api = LocalHubApi(tmp_path / "hub")
    push_to_hub(save_dir, "someone/r", api=api, create_pr=True)
    repo = api.repo_dir("someone/r")
    assert (save_dir / "README.md").read_text() == "my own notes\n"  # the card replaced it in the upload only
    card = ModelCard.load(repo / "README.md")
    assert "name: tiny-recipe" in card.text  # the recipe is shown in the card
    assert {r.metric_value for r in card.data.eval_results} == {0.8125, 0.796875}  # from eval_results.json
    assert not (repo / ".cache").exists()
    assert api.calls[1][1]["create_pr"] is True


def test_failed_upload_leaves_checkpoint_and_no_staging(checkpoint, tmp_path, monkeypatch):
    save_dir, _, _ = checkpoint
    before = _snapshot(save_dir)
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_root))

    class FailingApi(LocalHubApi):
        def create_commit(self, repo_id, operations, **kwargs):
            assert "README.md" in [op.path_in_repo for op in operations]
            raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        push_to_hub(save_dir, "someone/r", api=FailingApi(tmp_path / "hub"), token=TOKEN)
    assert _snapshot(save_dir) == before
    assert list(tmp_root.iterdir()) == []


def test_push_rejects_bad_input(checkpoint, tmp_path):
    save_dir, _, _ = checkpoint
    api = LocalHubApi(tmp_path / "hub")
    with pytest.raises(ValueError, match="invalid repo id"):
        push_to_hub(save_dir, "not a/valid//id", api=api)
    with pytest.raises(FileNotFoundError, match="not found"):
        push_to_hub(tmp_path / "missing", "someone/r", api=api)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    with pytest.raises(ValueError, match="quantization_config"):
        push_to_hub(plain, "someone/r", api=api)
    (plain / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(ValueError, match="expected 'adaquant'"):
        push_to_hub(plain, "someone/r", api=api)
    (plain / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "adaquant"}}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        push_to_hub(plain, "someone/r", api=api)
    assert api.calls == []  # nothing reached the Hub


def test_layer_bits_from_config_accepts_layouts():
    layout = {"checkpoint_layout": {"layers": {"conv1": {"weight_bits": 8, "activation_bits": 8},
                                               "fc": {"weight_bits": 4, "activation_bits": None}}},
              "layer_bits": {"conv1": [2, 4]}}
    assert layer_bits_from_config(layout) == {"conv1": (8, 8), "fc": (4, None)}  # the stored layout wins
    assert layer_bits_from_config({"plan": {"a": [4, 8], "b": 3}}) == {"a": (4, 8), "b": (3, None)}
    assert layer_bits_from_config({"weight_bits": 4}) == {}


def test_card_for_mixed_precision_transformers_checkpoint_without_eval(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(tmp_path / "adaquant_model.safetensors"))
    qcfg = {"quant_method": "adaquant", "weight_bits": 4, "activation_bits": 8, "first_last_bits": 8,
            "checkpoint_layout": {"layers": {"a": {"weight_bits": 8, "activation_bits": 8},
                                             "b": {"weight_bits": 2, "activation_bits": 8},
                                             "c": {"weight_bits": 4, "activation_bits": 4},
                                             "d": {"weight_bits": 8, "activation_bits": 8}}}}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert",
                                                      "architectures": ["BertForQuestionAnswering"],
                                                      "quantization_config": qcfg}))
    card = build_model_card(read_checkpoint_info(tmp_path), "me/bert-mixed")
    assert card.data.eval_results is None and "## Results" not in card.text
    assert "mixed W2-4/A4-8" in card.text and "mixed" in card.data.tags
    assert 'AutoModelForQuestionAnswering.from_pretrained("me/bert-mixed")' in card.text
    assert "n/a" in card.text  # no FP32 size known: ratio not invented
    assert not (tmp_path / "README.md").exists()  # building a card writes nothing


def test_card_for_plain_pytorch_checkpoint_explains_the_skeleton(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(4)}, str(tmp_path / "adaquant_model.safetensors"))
    qcfg = {"quant_method": "adaquant", "weight_bits": 4, "activation_bits": 4}
    (tmp_path / "config.json").write_text(json.dumps({"hf_adaquant_model_class": "pkg.nets.MyNet",
                                                      "quantization_config": qcfg}))
    text = build_model_card(read_checkpoint_info(tmp_path), "me/net").text
    assert "pkg.nets.MyNet" in text and 'load_quantized("me/net", model=float_model)' in text
    assert "W4A4 post-training quantization of a float model" in text


def test_push_passes_hub_arguments_in_one_commit(checkpoint, tmp_path):
    save_dir, _, _ = checkpoint
    before = _snapshot(save_dir)
    api = LocalHubApi(tmp_path / "hub")
    result = push_to_hub(save_dir, "someone/r", api=api, token=TOKEN, revision="w4a8", commit_message="msg",
                         commit_description="long description", tags=["imagenet", "adaquant"])
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "create_commit"]
    repo_call, branch_call, commit = (c[1] for c in api.calls)
    assert repo_call["private"] is None and repo_call["exist_ok"] is True  # private=None: the Hub's default
    assert branch_call == dict(repo_id="someone/r", branch="w4a8", token=TOKEN, repo_type="model", exist_ok=True)
    assert commit["revision"] == "w4a8" and commit["commit_message"] == "msg"
    assert commit["commit_description"] == "long description" and commit["token"] == TOKEN
    assert commit["create_pr"] is False and commit["repo_type"] == "model"
    assert sorted(commit["operations"]) == sorted(set(before) | {"README.md"})
    assert result.commit_description == "long description"
    card = ModelCard.load(api.repo_dir("someone/r", "w4a8") / "README.md")
    assert card.data.tags[:2] == ["hf-adaquant", "adaquant"] and card.data.tags[-1] == "imagenet"
    assert card.data.tags.count("adaquant") == 1
    assert _snapshot(save_dir) == before


def test_push_defaults_match_huggingface_hub(checkpoint, tmp_path):
    import inspect

    from huggingface_hub import HfApi

    params = inspect.signature(push_to_hub).parameters
    for name, default in dict(private=None, token=None, revision=None, commit_message=None,
                              commit_description=None, create_pr=False, tags=None).items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default, name
    assert set(params) >= set(inspect.signature(HfApi.create_commit).parameters) & {
        "commit_message", "commit_description", "token", "revision", "create_pr"}
    save_dir, _, _ = checkpoint
    api = LocalHubApi(tmp_path / "hub")
    push_to_hub(save_dir, "someone/r", api=api, create_pr=True, revision="refs/pr/3")
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]  # a PR ref is never made a branch
    assert api.calls[1][1]["commit_message"].startswith("Upload AdaQuant")


# ------------------------------------------------------------------------------- Hub methods on timm / plain models
def test_timm_and_plain_models_get_hub_methods(tmp_path):
    import timm

    from tests.conftest import make_batches, make_tiny_cnn

    torch.manual_seed(0)
    config = AdaQuantConfig(weight_bits=4, activation_bits=8, pipeline="light", progress=False, seed=0)
    timm_model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    qtimm = quantize(timm_model, [torch.randn(4, 3, 32, 32)], config)
    batches = make_batches(2, 8)
    qplain = quantize(make_tiny_cnn(0, batches), batches, config)
    x = torch.randn(2, 3, 32, 32)
    for name, qmodel, skeleton in (("timm", qtimm, None), ("plain", qplain, make_tiny_cnn())):
        assert not hasattr(timm_model, "push_to_hub")  # the float model is not touched
        inputs = x if name == "timm" else batches[0]
        saved = qmodel.save_pretrained(tmp_path / name)
        assert (saved / "adaquant_model.safetensors").is_file()
        kwargs = {} if skeleton is None else {"model": skeleton}
        again = qmodel.from_pretrained(tmp_path / name, **kwargs)
        with torch.no_grad():
            assert torch.equal(again(inputs), qmodel(inputs))
        assert callable(again.push_to_hub)  # a reloaded model has the methods too

        api = LocalHubApi(tmp_path / f"hub-{name}")
        qmodel.push_to_hub(f"someone/{name}", private=True, revision="dev", commit_description="d", tags=["x"],
                           token=TOKEN, api=api)
        assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "create_commit"]
        assert api.calls[0][1]["private"] is True and api.calls[2][1]["commit_description"] == "d"
        repo = api.repo_dir(f"someone/{name}", "dev")
        card = ModelCard.load(repo / "README.md")
        assert card.data.library_name == "hf-adaquant" and "x" in card.data.tags
        plain_load = load_quantized(repo, **kwargs)
        with torch.no_grad():
            assert torch.equal(plain_load(inputs), qmodel(inputs))
        assert callable(plain_load.save_pretrained) and callable(plain_load.push_to_hub)  # load_quantized too

        api2 = LocalHubApi(tmp_path / f"hub2-{name}")
        qmodel.save_pretrained(tmp_path / f"{name}-2", push_to_hub=True, repo_id=f"someone/{name}-2", api=api2,
                               commit_message="via save_pretrained")
        assert api2.calls[-1][1]["commit_message"] == "via save_pretrained"
        assert (api2.repo_dir(f"someone/{name}-2") / "README.md").is_file()
