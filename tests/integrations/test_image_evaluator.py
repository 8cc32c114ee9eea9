"""evaluate.evaluator("image-classification") for transformers image models (offline, tiny models from configs);
our loops for timm / plain models."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from hf_adaquant import AdaQuantConfig, quantize
from hf_adaquant.integrations.image_evaluator import (evaluate_image_classifier, image_label_mapping,
                                                      supports_image_evaluator)
from hf_adaquant.recipes import build_calibration, build_evaluator, build_model, load_recipe
from hf_adaquant.recipes import evaluate as evaluate_module

transformers = pytest.importorskip("transformers")


def _vit(num_labels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=num_labels)
    return transformers.ViTForImageClassification(config).eval()


def _convnext(num_labels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=num_labels,
                                         image_size=32)
    return transformers.ConvNextForImageClassification(config).eval()


def _processor():
    return transformers.ViTImageProcessor(size={"height": 32, "width": 32})


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + i % 5, 48, 3), dtype=np.uint8)) for i in range(n)]


@torch.no_grad()
def _predictions(model: nn.Module, images: list[Image.Image]) -> list[int]:
    """Our own loop: the processor's tensors through the model, arg-max."""
    pixels = _processor()([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    return model(pixels).logits.argmax(-1).tolist()


def _labels_with_known_accuracy(preds: list[int], num_right: int, num_labels: int) -> list[int]:
    return [p if i < num_right else (p + 1) % num_labels for i, p in enumerate(preds)]


@pytest.mark.parametrize("make_model", [_vit, _convnext], ids=["vit", "convnext"])
def test_evaluator_scores_a_transformers_image_model_offline(make_model, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = make_model()
    images = _images(11)
    labels = _labels_with_known_accuracy(_predictions(model, images), 7, 4)
    data = datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column("image", datasets.Image())
    for batch_size in (1, 4):
        result = evaluate_image_classifier(model, data, _processor(), batch_size=batch_size)
        assert (result["correct"], result["total"]) == (7, 11)
        assert result["accuracy"] == pytest.approx(7 / 11)
    assert not model.training


def test_which_models_the_evaluator_supports():
    import timm

    vit = _vit()
    assert supports_image_evaluator(vit) and image_label_mapping(vit) == {f"LABEL_{i}": i for i in range(4)}
    duplicate = _vit()
    duplicate.config.id2label = {0: "crane", 1: "crane", 2: "heron", 3: "stork"}  # as ImageNet's 134 and 517
    assert image_label_mapping(duplicate) is None and not supports_image_evaluator(duplicate)
    tm = timm.create_model("test_resnet", pretrained=False, num_classes=4)
    assert not supports_image_evaluator(tm) and not supports_image_evaluator(nn.Linear(3, 4))
    data = datasets.Dataset.from_dict({"image": _images(2), "label": [0, 1]})
    with pytest.raises(ValueError, match="transformers model with unique id2label"):
        evaluate_image_classifier(tm, data, _processor())


def _labelled_folder(root: Path, images: list[Image.Image], labels: list[int]) -> Path:
    root.mkdir(parents=True)
    rows = ["filename,label_index,synset"]
    for i, (image, label) in enumerate(zip(images, labels)):
        image.save(root / f"im{i:02d}.png")
        rows.append(f"im{i:02d}.png,{label},n{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _spy(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = evaluate_module.evaluate_image_classifier

    def spy(model, *args, **kwargs):
        calls.append(type(model).__name__)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_image_classifier", spy)
    return calls


def test_recipe_evaluates_transformers_image_models_through_evaluate(tmp_path, monkeypatch):
    vit = _vit()
    vit.save_pretrained(tmp_path / "vit")
    _processor().save_pretrained(tmp_path / "vit")
    images = _images(10, seed=3)
    preds = _predictions(vit, images)
    _labelled_folder(tmp_path / "val", images, _labels_with_known_accuracy(preds, 6, 4))
    _labelled_folder(tmp_path / "calib", _images(8, seed=4), [0] * 8)
    raw = {"name": "vit-tiny",
           "model": {"source": "transformers", "id": str(tmp_path / "vit"), "task": "image-classification"},
           "calibration": {"source": "image_folder", "path": str(tmp_path / "calib"), "batch_size": 4,
                           "num_samples": 8},
           "evaluation": {"task": "image-classification", "source": "image_folder", "path": str(tmp_path / "val"),
                          "batch_size": 4},
           "quantization": {"weight_bits": 8, "activation_bits": 8, "pipeline": "light", "progress": False}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp_path / "r.yaml")
    built = build_model(recipe)
    calibration = build_calibration(recipe, built)  # preprocessing "auto": the model's image processor
    pixels = _processor()([im.convert("RGB") for im in _images(8, seed=4)], return_tensors="pt")["pixel_values"]
    assert torch.equal(torch.cat(calibration), pixels)
    qmodel = quantize(built.model, calibration, AdaQuantConfig(weight_bits=8, activation_bits=8, pipeline="light",
                                                                progress=False))
    calls = _spy(monkeypatch)
    evaluator = build_evaluator(recipe, built)
    metrics = evaluator({"fp32": built.model, "quantized": qmodel})
    assert calls == ["ViTForImageClassification"] * 2  # both went through evaluate.evaluator
    labels = _labels_with_known_accuracy(preds, 6, 4)
    expected_q = sum(p == y for p, y in zip(_predictions(qmodel, images), labels)) / 10
    assert metrics == {"fp32": {"accuracy": 0.6}, "quantized": {"accuracy": pytest.approx(expected_q)}}
    assert evaluator.num_evaluated == 10


def test_recipe_keeps_our_loop_for_timm_models(tmp_path, monkeypatch):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_resnet", pretrained=False, num_classes=4).eval(), str(tmp_path / "tm"),
                safe_serialization=True)
    _labelled_folder(tmp_path / "val", _images(5), [0, 1, 2, 3, 0])
    raw = {"name": "timm-tiny", "model": {"source": "timm", "name": f"local-dir:{tmp_path / 'tm'}"},
           "calibration": {"source": "image_folder", "path": str(tmp_path / "val"), "num_samples": 5},
           "evaluation": {"task": "image-classification", "source": "image_folder", "path": str(tmp_path / "val")},
           "quantization": {"weight_bits": 8, "activation_bits": 8}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp_path / "r.yaml")
    built = build_model(recipe)
    calls = _spy(monkeypatch)
    metrics = build_evaluator(recipe, built)({"fp32": built.model})
    assert calls == [] and 0.0 <= metrics["fp32"]["accuracy"] <= 1.0


@pytest.mark.parametrize("streaming", [False, True])
def test_image_dataset_from_a_hub_style_dataset(tmp_path, monkeypatch, streaming):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for label in ("a", "b"):  # a local imagefolder (class sub-folders) stands in for a Hub dataset
        (tmp_path / "ds" / label).mkdir(parents=True)
        for i, image in enumerate(_images(3, seed=ord(label))):
            image.save(tmp_path / "ds" / label / f"{i}.png")
    spec = {"source": "hf_image_dataset", "name": str(tmp_path / "ds"), "config": None, "split": "train",
            "streaming": streaming}
    data = evaluate_module._image_dataset(spec, 4)
    assert isinstance(data, datasets.Dataset) and len(data) == 4
    assert isinstance(data[0]["image"], Image.Image) and set(data["label"]) <= {0, 1}
    assert len(evaluate_module._image_dataset(spec, None)) == 6


def test_transformers_image_model_without_a_recipe(tmp_path):
    from hf_adaquant.recipes import parse_recipe
    from hf_adaquant.recipes.from_model import recipe_for_model

    _vit().save_pretrained(tmp_path / "vit")
    _processor().save_pretrained(tmp_path / "vit")
    (tmp_path / "calib").mkdir()
    images = _images(6, seed=5)
    for i, image in enumerate(images):
        image.save(tmp_path / "calib" / f"{i}.png")
    raw = recipe_for_model(str(tmp_path / "vit"), dataset=str(tmp_path / "calib"), num_samples=6, weights="int8")
    recipe = parse_recipe(raw)
    assert recipe.model["task"] == "image-classification" and recipe.calibration["preprocessing"] == "auto"
    built = build_model(recipe)
    batches = build_calibration(recipe, built)
    assert torch.cat(batches).shape == (6, 3, 32, 32)  # the processor's size, not timm's
    pixels = _processor()([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    assert {tuple(round(v, 4) for v in row.flatten()[:8].tolist()) for row in torch.cat(batches)} == \
        {tuple(round(v, 4) for v in row.flatten()[:8].tolist()) for row in pixels}  # shuffled, same images
