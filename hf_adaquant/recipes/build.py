"""Turn a validated :class:`Recipe` into a model and calibration batches (the evaluator: :mod:`.evaluate`).

Reuses the project's loaders (``hf_adaquant.models``, ``hf_adaquant.data``, ``hf_adaquant.tasks.squad``); Hub
models and ``datasets`` are only touched when a recipe names them (users online), never at import time.
"""

from __future__ import annotations

import importlib
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data import ImageFolderWithLabels, efficientnet_lite0_transform, load_cifar10_npz
from ..integrations.auto_classes import auto_class_name
from ..integrations.calibration import load_calibration_dataset, model_input_names, tokenize_texts
from ..models import load_cifar_resnet, load_efficientnet_lite0
from ..tasks.squad import SquadExample, load_squad_examples, squad_calibration_batches
from .schema import Recipe, RecipeError

__all__ = ["BuiltModel", "build_calibration", "build_model", "get_image_processor", "image_batches", "preprocessing_of",
           "squad_examples"]

_logger = logging.getLogger(__name__)

@dataclass
class BuiltModel:
    """The float model of a recipe, with its tokenizer (transformers text models) and image processor
    (transformers image models with ``preprocessing: transformers``; loaded on first use)."""

    model: nn.Module
    tokenizer: Any = None
    image_processor: Any = None


def _build_factory(spec: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec["callable"].partition(":")
    if not attr:
        raise RecipeError(f"model.callable must look like 'package.module:function', got {spec['callable']!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"model.callable {spec['callable']!r} cannot be imported: {err}") from None
    model = factory(**spec["kwargs"])
    if not isinstance(model, nn.Module):
        raise RecipeError(f"model.callable {spec['callable']!r} returned {type(model).__name__}, not an nn.Module")
    return model


def build_model(recipe: Recipe) -> BuiltModel:
    """Build (and load) the recipe's float model in eval mode."""
    spec, source = recipe.model, recipe.model["source"]
    tokenizer = None
    # Randomly initialised parts (pretrained=False, new heads) must be the same on every run and on every rank
    # of a distributed launch: otherwise each rank would quantize a different model.
    torch.manual_seed(recipe.quantization.seed)
    if source == "timm":
        import timm

        kwargs = dict(spec["kwargs"])
        if spec["checkpoint"] is not None:  # offline weights for a registered architecture
            kwargs["pretrained_cfg_overlay"] = {"file": str(spec["checkpoint"])}
        name = spec["name"]
        if spec["revision"] is not None and not name.startswith("local-dir:"):  # timm: "hf-hub:<id>@<rev>"
            name = f"{name if name.startswith('hf-hub:') else 'hf-hub:' + name}@{spec['revision']}"
        model = timm.create_model(name, pretrained=spec["pretrained"] or spec["checkpoint"] is not None, **kwargs)
    elif source == "transformers":
        import transformers

        auto = getattr(transformers, auto_class_name(spec["task"]))
        dtype = getattr(torch, spec["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise RecipeError(f"model.dtype {spec['dtype']!r} is not a torch dtype")
        hub_kwargs = {"revision": spec["revision"], "trust_remote_code": spec["trust_remote_code"]}
        model = auto.from_pretrained(spec["id"], dtype=dtype, **hub_kwargs)
        if spec["task"] != "image-classification":
            tokenizer = transformers.AutoTokenizer.from_pretrained(spec["id"], **hub_kwargs)
    elif source == "cifar_resnet":
        model = load_cifar_resnet(spec["depth"], spec["checkpoint"])
    elif source == "efficientnet_lite0":
        model = load_efficientnet_lite0()
    else:
        model = _build_factory(spec)
    return BuiltModel(model=model.eval(), tokenizer=tokenizer)


def preprocessing_of(spec: dict[str, Any], recipe: Recipe) -> str:
    """The data section's preprocessing, with ``auto`` resolved by the model's library."""
    if spec["preprocessing"] != "auto":
        return spec["preprocessing"]
    return "transformers" if recipe.model["source"] == "transformers" else "timm"


def get_image_processor(recipe: Recipe, built: BuiltModel) -> Any:
    """The transformers model's ``AutoImageProcessor`` (loaded once, from the recipe's model id)."""
    if built.image_processor is None:
        if recipe.model["source"] != "transformers":
            raise RecipeError("preprocessing 'transformers' needs a transformers model (its image processor); "
                              "pick another preprocessing")
        import transformers  # heavy optional work, as in build_model

        built.image_processor = transformers.AutoImageProcessor.from_pretrained(
            recipe.model["id"], revision=recipe.model["revision"], trust_remote_code=recipe.model["trust_remote_code"])
    return built.image_processor


@dataclass(frozen=True)
class _ProcessorTransform:
    """PIL image -> ``(C, H, W)`` tensor by a transformers image processor (a class, not a lambda: DataLoader
    workers started by spawn pickle it)."""

    processor: Any

    def __call__(self, image: Any) -> Tensor:
        return self.processor(image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def _image_transform(preprocessing: str, recipe: Recipe, built: BuiltModel) -> Callable:
    if preprocessing == "efficientnet_lite0":
        return efficientnet_lite0_transform()
    if preprocessing == "transformers":
        return _ProcessorTransform(get_image_processor(recipe, built))
    import timm.data

    if getattr(built.model, "pretrained_cfg", None) is None:
        raise RecipeError("preprocessing 'timm' needs a timm model (its pretrained_cfg gives size/mean/std); "
                          "pick another preprocessing")
    return timm.data.create_transform(**timm.data.resolve_model_data_config(built.model), is_training=False)


def image_batches(spec: dict[str, Any], recipe: Recipe, built: BuiltModel, limit: int | None, batch_size: int, *,
                   shuffle_seed: int | None = None, num_workers: int = 2) -> Iterator[tuple[Tensor, Tensor]]:
    """``(x, y)`` batches of an image source, at most ``limit`` samples, decoded lazily (ImageNet val is big)."""
    source = spec["source"]
    if source == "cifar10_npz":
        x, y = load_cifar10_npz(spec["path"], limit=limit)
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
    elif source == "synthetic":
        g = torch.Generator().manual_seed(spec["seed"])
        n = limit or batch_size
        x = torch.randn(n, *spec["shape"], generator=g)
        y = torch.randint(0, spec["num_classes"], (n,), generator=g)
        for i in range(0, n, batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
    elif source == "image_folder":
        transform = _image_transform(preprocessing_of(spec, recipe), recipe, built)
        ds = ImageFolderWithLabels(spec["path"], transform=transform, limit=limit)
        if len(ds) == 0:
            raise RecipeError(f"{spec['path']} lists no images in labels.csv")
        # decoded in worker processes, batches in file order
        yield from DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    else:  # hf_image_dataset
        import datasets

        ds = datasets.load_dataset(spec["name"], spec["config"], split=spec["split"], streaming=spec["streaming"])
        if shuffle_seed is not None:
            ds = ds.shuffle(seed=shuffle_seed, **({"buffer_size": 10_000} if spec["streaming"] else {}))
        transform = _image_transform(preprocessing_of(spec, recipe), recipe, built)
        rows = iter(ds) if limit is None else itertools.islice(ds, limit)
        while chunk := list(itertools.islice(rows, batch_size)):
            # calibration needs no labels: an unlabeled image folder gives -1
            yield (torch.stack([transform(r[spec["image_column"]].convert("RGB")) for r in chunk]),
                   torch.tensor([int(r.get(spec["label_column"], -1)) for r in chunk]))


def squad_examples(spec: dict[str, Any], limit: int | None) -> list:
    """The SQuAD examples of a data section (local JSON or a Hub dataset), at most ``limit``."""
    if spec["source"] == "squad_json":
        examples = load_squad_examples(spec["path"], articles=spec["articles"])
    else:
        import datasets

        rows = datasets.load_dataset(spec["name"], spec["config"], split=spec["split"])
        examples = [SquadExample(id=r["id"], article=0, title=r.get("title", ""), context=r["context"],
                                 question=r["question"], answers={"text": list(r["answers"]["text"]),
                                 "answer_start": list(r["answers"]["answer_start"])}) for r in rows]
    return examples if limit is None else examples[:limit]


def _text_batches(spec: dict[str, Any], built: BuiltModel, seed: int) -> list[dict[str, Tensor]]:
    """Tokenised calibration batches from a text dataset (Hub name, local json or folder)."""
    if built.tokenizer is None:
        raise RecipeError("text calibration data needs a transformers model with a tokenizer")
    ds = load_calibration_dataset(spec["name"], spec["num_samples"], dataset_config_name=spec["config"],
                                  dataset_split=spec["split"], seed=seed)
    accepted = model_input_names(built.model)
    batches = []
    for start in range(0, len(ds), spec["batch_size"]):
        encoded = tokenize_texts(built.tokenizer, ds[start:start + spec["batch_size"]], spec["text_column"],
                                 spec["max_length"])
        batches.append({k: v for k, v in encoded.items() if accepted is None or k in accepted})
    if not batches:
        raise RecipeError("calibration data is empty")
    return batches


def build_calibration(recipe: Recipe, built: BuiltModel) -> list[Any]:
    """The recipe's unlabeled calibration batches (tensors, or dicts of tensors for text models)."""
    spec = recipe.calibration
    seed = recipe.quantization.seed
    if spec["source"] in ("squad_json", "hf_squad"):
        if built.tokenizer is None:
            raise RecipeError("SQuAD calibration data needs a transformers model with a tokenizer")
        return squad_calibration_batches(squad_examples(spec, None), built.tokenizer, spec["num_samples"],
                                         spec["batch_size"], max_length=spec["max_length"], stride=spec["stride"],
                                         seed=seed)
    if spec["source"] == "text":
        return _text_batches(spec, built, seed)
    batches = [x for x, _ in image_batches(spec, recipe, built, spec["num_samples"], spec["batch_size"],
                                            shuffle_seed=seed)]
    if not batches:
        raise RecipeError("calibration data is empty")
    return batches
