"""Recipes: shipped files validate; malformed recipes fail naming the key/file; builders feed real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from hf_adaquant.data import repo_root, shared_dir
from hf_adaquant.recipes import RecipeError, build_calibration, build_evaluator, build_model, load_recipe, parse_recipe
from hf_adaquant.recipes.build import BuiltModel

SHIPPED = sorted((repo_root() / "recipes").glob("*.yaml"))
needs_shared = pytest.mark.skipif(shared_dir() is None, reason="needs the shared/ models and data folder")


def _write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _base() -> dict:
    return {"name": "tiny",
            "model": {"source": "factory", "callable": "torch.nn:Linear", "kwargs": {"in_features": 4,
                                                                                   "out_features": 3}},
            "calibration": {"source": "synthetic", "shape": [4], "num_samples": 10, "batch_size": 4},
            "evaluation": {"task": "image-classification", "source": "synthetic", "shape": [4], "num_samples": 8},
            "quantization": {"weight_bits": 4, "activation_bits": 8, "iterations": 2}}


def test_shipped_recipes_cover_the_paper_and_offline_models():
    names = {p.stem for p in SHIPPED}
    for expected in ("resnet18-imagenet-w4a4", "resnet50-imagenet-w4a4", "mobilenetv2-100-imagenet-w4a4",
                     "bert-base-squad-w8a8", "efficientnet-lite0-w4a8", "cifar10-resnet20-w4a4",
                     "cifar10-resnet56-w4a4", "minilm-squad-w8a8", "minilm-squad-w4a8"):
        assert expected in names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipe_parses_and_validates(path: Path):
    recipe = load_recipe(path, check_files=False)
    assert recipe.name == path.stem
    assert recipe.evaluation is not None and recipe.description
    assert 2 <= recipe.quantization.weight_bits <= 8
    if recipe.model["source"] in ("timm", "transformers") and not Path(recipe.model.get("id", "x")).is_absolute():
        assert recipe.base_model_id and "/" in recipe.base_model_id  # Hub recipes name their Hub model
    if shared_dir() is not None:
        load_recipe(path, check_files=True)  # every local file the recipe names exists


def test_shipped_recipes_validate_without_shared_folder(monkeypatch):
    monkeypatch.setattr("hf_adaquant.recipes.schema.shared_dir", lambda: None)
    for path in SHIPPED:
        load_recipe(path, check_files=False)  # structure only: CI machines without ../shared
    with pytest.raises(RecipeError, match="needs the shared models/data folder"):
        load_recipe(repo_root() / "recipes" / "cifar10-resnet20-w4a4.yaml")


def test_hub_recipe_ids():
    assert load_recipe(repo_root() / "recipes" / "resnet18-imagenet-w4a4.yaml").base_model_id == \
        "timm/resnet18.tv_in1k"
    assert load_recipe("bert-base-squad-w8a8").base_model_id == "csarron/bert-base-uncased-squad-v1"  # by name


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(extra=1), r"unknown top-level key\(s\) \['extra'\]"),
    (lambda r: r["model"].update(colour="red"), r"model: unknown key\(s\) \['colour'\]"),
    (lambda r: r["model"].update(source="magic"), r"model.source must be one of"),
    (lambda r: r["calibration"].pop("num_samples"), r"calibration: missing required key 'num_samples'"),
    (lambda r: r["calibration"].update(batch_size="big"), r"calibration.batch_size must be int"),
    (lambda r: r["calibration"].update(batch_size=0), r"calibration.batch_size must be >= 1"),
    (lambda r: r["quantization"].update(weight_bitz=4),
     r"quantization: unknown AdaQuantConfig fields \['weight_bitz'\]"),
    (lambda r: r["quantization"].update(weight_bits=9), r"quantization: weight_bits must be an integer in 2..8"),
    (lambda r: r["evaluation"].update(task="question-answering"), r"evaluation.source 'synthetic' cannot feed"),
    (lambda r: r["evaluation"].update(task="segmentation"), r"evaluation.task must be one of"),
    (lambda r: r.pop("calibration"), r"missing required section 'calibration'"),
    (lambda r: r.update(calibration={"source": "image_folder", "path": "nowhere/images", "num_samples": 4}),
     r"calibration.path: file not found: .*nowhere/images"),
])
def test_invalid_recipes_name_the_problem(tmp_path, mutate, message):
    raw = _base()
    mutate(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(RecipeError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value)  # the error names the file


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, _base())
    recipe = load_recipe(path, ["quantization.iterations=7", "calibration.num_samples=6",
                                "quantization.include=[fc*]"])
    assert recipe.quantization.iterations == 7 and recipe.calibration["num_samples"] == 6
    assert recipe.quantization.include == ["fc*"]
    assert yaml.safe_load(recipe.to_yaml())["quantization"]["iterations"] == 7
    with pytest.raises(RecipeError, match="unknown AdaQuantConfig fields"):
        load_recipe(path, ["quantization.iters=7"])
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(path, ["iterations"])


def test_yaml_numbers_and_single_patterns_reach_the_config_as_meant(tmp_path):
    """YAML 1.1 reads 1e-3 as a string and a pattern may be written without a list: both mean what they say."""
    text = yaml.safe_dump(_base(), sort_keys=False).replace(
        "  iterations: 2\n", "  iterations: 2\n  lr_weight: 1e-3\n  include: conv*\n  exclude: fc\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert yaml.safe_load(text)["quantization"]["lr_weight"] == "1e-3"  # the YAML quirk the recipe layer fixes
    config = load_recipe(path).quantization
    assert config.lr_weight == 1e-3 and config.include == ["conv*"] and config.exclude == ["fc"]
    config = load_recipe(path, ["quantization.lr_bias=2e-4", "quantization.include=dw"]).quantization  # --set
    assert config.lr_bias == 2e-4 and config.include == ["dw"]
    with pytest.raises(RecipeError, match=r"quantization: lr_weight must be a finite number >= 0, got the string "
                                          r"'fast'"):
        load_recipe(path, ["quantization.lr_weight=fast"])
    with pytest.raises(RecipeError, match=r"quantization: seed must be an integer, got float 1.5"):
        load_recipe(path, ["quantization.seed=1.5"])
    with pytest.raises(RecipeError, match=r"quantization: bn_tuning must be True or False, got str 'maybe'"):
        load_recipe(path, ["quantization.bn_tuning=maybe"])


def test_paths_resolve_against_recipe_folder_and_project(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "calib.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))
    raw = _base()
    raw["calibration"] = {"source": "cifar10_npz", "path": "data/calib.npz", "num_samples": 4}
    raw["evaluation"] = {"task": "image-classification", "source": "image_folder",
                         "path": "${project}/demo_data/imagenet/val", "preprocessing": "efficientnet_lite0"}
    recipe = load_recipe(_write(tmp_path, raw, "sub.yaml"))
    assert recipe.calibration["path"] == tmp_path / "data" / "calib.npz"
    assert recipe.evaluation["path"] == repo_root() / "demo_data" / "imagenet" / "val"
    assert yaml.safe_load(recipe.to_yaml())["calibration"]["path"] == str(tmp_path / "data" / "calib.npz")
    raw["calibration"]["path"] = "${shared}/data/cifar10/calib.npz"
    monkeypatch.setattr("hf_adaquant.recipes.schema.shared_dir", lambda: None)
    with pytest.raises(RecipeError, match=r"calibration.path: .*needs the shared models/data folder"):
        parse_recipe(raw)


class _ConstantClassifier(nn.Module):
    """Predicts ``cls`` for every input (logits one-hot)."""

    def __init__(self, cls: int) -> None:
        super().__init__()
        self.cls = cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.cls), 10).float()


def test_evaluator_accuracy_matches_labels(tmp_path):
    y = np.array([0, 1, 1, 2, 1, 3, 1, 4, 5, 1], np.int64)  # class 1: 5 of 10
    np.savez(tmp_path / "test.npz", x=np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8), y=y)
    raw = _base()
    raw["evaluation"] = {"task": "image-classification", "source": "cifar10_npz", "path": "test.npz",
                         "batch_size": 3}
    recipe = load_recipe(_write(tmp_path, raw))
    evaluator = build_evaluator(recipe, BuiltModel(model=_ConstantClassifier(1)))
    metrics = evaluator({"a": _ConstantClassifier(1), "b": _ConstantClassifier(2)})
    assert metrics == {"a": {"accuracy": 0.5}, "b": {"accuracy": 0.1}}
    assert evaluator.dataset["type"] == "cifar10" and evaluator.dataset["name"] == "test.npz"
    assert evaluator.dataset["num_samples"] == 10
    raw["evaluation"]["num_samples"] = 4  # first 4 labels: 0, 1, 1, 2
    evaluator = build_evaluator(load_recipe(_write(tmp_path, raw)), BuiltModel(model=_ConstantClassifier(1)))
    assert evaluator({"a": _ConstantClassifier(1)}) == {"a": {"accuracy": 0.5}}


def test_factory_model_and_synthetic_calibration(tmp_path):
    recipe = load_recipe(_write(tmp_path, _base()))
    built = build_model(recipe)
    assert isinstance(built.model, nn.Linear) and not built.model.training
    batches = build_calibration(recipe, built)
    assert [tuple(b.shape) for b in batches] == [(4, 4), (4, 4), (2, 4)]
    raw = _base()
    raw["model"]["callable"] = "torch.nn:NoSuchThing"
    with pytest.raises(RecipeError, match="cannot be imported"):
        build_model(load_recipe(_write(tmp_path, raw)))


def test_random_init_model_is_the_same_on_every_build(tmp_path):
    """Every rank of a distributed launch builds the recipe's model: random weights must not differ between them."""
    recipe = load_recipe(_write(tmp_path, _base()))
    torch.manual_seed(123)
    first = build_model(recipe).model.weight.detach().clone()
    torch.manual_seed(456)  # whatever the caller's RNG state
    assert torch.equal(build_model(recipe).model.weight, first)
    other_seed = _base()
    other_seed["quantization"]["seed"] = 1
    assert not torch.equal(build_model(load_recipe(_write(tmp_path, other_seed, "s.yaml"))).model.weight, first)


@needs_shared
def test_cifar_recipe_builds_model_and_calibration():
    recipe = load_recipe("cifar10-resnet20-w4a4", ["calibration.num_samples=150"])
    built = build_model(recipe)
    batches = build_calibration(recipe, built)
    assert [b.shape[0] for b in batches] == [100, 50] and batches[0].shape[1:] == (3, 32, 32)
    # the checkpoint is the real one: most of a test slice is classified right
    recipe = load_recipe("cifar10-resnet20-w4a4", ["evaluation.num_samples=200"])
    accuracy = build_evaluator(recipe, built)({"fp32": built.model})["fp32"]["accuracy"]
    assert accuracy > 0.85


@needs_shared
def test_minilm_recipe_builds_squad_calibration_batches():
    recipe = load_recipe("minilm-squad-w8a8", ["calibration.num_samples=6", "calibration.batch_size=4",
                                               "calibration.articles=0-1"])  # tokenising 40 articles is slow
    built = build_model(recipe)
    assert built.tokenizer is not None and next(built.model.parameters()).dtype == torch.float32
    batches = build_calibration(recipe, built)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    assert all(b["input_ids"].shape[1] <= 192 and set(b) >= {"input_ids", "attention_mask"} for b in batches)


def test_recipes_ship_as_package_data():
    """A wheel has no repository ``recipes/``: recipes are package data found through importlib.resources, by name,
    and the repository folder is the same files (a link), so both spellings load the same recipe."""
    import importlib.resources

    from hf_adaquant.recipes.loading import shipped_recipes

    folder = importlib.resources.files("hf_adaquant.recipes").joinpath("shipped")
    names = shipped_recipes()
    assert "cifar10-resnet20-w4a4" in names and "bert-base-squad-w4a8" in names
    assert sorted(p.stem for p in SHIPPED) == names  # the repository's recipes/ is the packaged folder
    by_name = load_recipe("cifar10-resnet20-w4a4", check_files=False)
    assert by_name.path == Path(str(folder.joinpath("cifar10-resnet20-w4a4.yaml"))).resolve()
    by_path = load_recipe(repo_root() / "recipes" / "cifar10-resnet20-w4a4.yaml", check_files=False)
    assert by_name.raw == by_path.raw and by_name.quantization.to_dict() == by_path.quantization.to_dict()
    with pytest.raises(RecipeError, match="shipped recipes: .*cifar10-resnet20-w4a4"):
        load_recipe("no-such-recipe")
    # pyproject's package-data pattern covers every shipped file (setuptools copies only what it matches)
    import fnmatch
    import tomllib

    pyproject = tomllib.loads((repo_root() / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["hf_adaquant"]
    for name in names:
        assert any(fnmatch.fnmatch(f"recipes/shipped/{name}.yaml", p) for p in patterns), name


def test_bert_recipes_use_the_one_bert_policy():
    """The BERT QA policy is written once (hf_adaquant/policies.py): the SQuAD benchmark's function and the shipped
    BERT/MiniLM recipes (``policy: bert-qa``) give the same config, first encoder layer included."""
    from hf_adaquant.policies import POLICIES, bert_qa_quantization_config
    from hf_adaquant.tasks.squad import bert_qa_quantization_config as benchmark_policy

    assert benchmark_policy is bert_qa_quantization_config is POLICIES["bert-qa"]
    qa = [p for p in SHIPPED if yaml.safe_load(p.read_text())["model"].get("task") == "question-answering"]
    assert len(qa) == 4
    for path in qa:
        fields = dict(yaml.safe_load(path.read_text())["quantization"])
        assert fields.pop("policy") == "bert-qa", path.name
        config = load_recipe(path, check_files=False).quantization
        assert config.to_dict() == bert_qa_quantization_config(**fields).to_dict(), path.name
        assert config.first_last_bits is None  # no 8-bit exception for the first encoder layer
        assert {k: tuple(v) for k, v in config.layer_bits.items()} == {"qa_outputs": (8, 8)}
        assert list(config.include) == ["*encoder.layer.*", "qa_outputs"]


def test_unknown_policy_is_refused(tmp_path):
    raw = {"model": {"source": "efficientnet_lite0"}, "calibration": {"source": "synthetic", "shape": [3, 8, 8],
                                                                       "num_samples": 4},
           "quantization": {"policy": "gpt-qa", "weight_bits": 4}}
    with pytest.raises(RecipeError, match=r"quantization.policy must be one of \['bert-qa'\], got 'gpt-qa'"):
        parse_recipe(raw, check_files=False)
    raw["quantization"]["policy"] = "bert-qa"
    raw["quantization"]["head_bits"] = [8, 4]  # a policy argument, not a config field
    config = parse_recipe(raw, check_files=False).quantization
    assert {k: tuple(v) for k, v in config.layer_bits.items()} == {"qa_outputs": (8, 4)}
