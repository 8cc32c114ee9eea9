"""Turn a validated :class:`Recipe` into a model, calibration batches and an evaluator.

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
from ..integrations.calibration import load_calibration_dataset, model_input_names, tokenize_texts
from ..integrations.image_evaluator import evaluate_image_classifier, supports_image_evaluator
from ..metrics import load_metric
from ..models import load_cifar_resnet, load_efficientnet_lite0
from ..tasks.squad import SquadExample, evaluate_squad_model, load_squad_examples, squad_calibration_batches
from ..utils.logging import progress_bar
from .schema import Recipe, RecipeError

__all__ = ["BuiltModel", "Evaluator", "build_calibration", "build_evaluator", "build_model"]

_logger = logging.getLogger(__name__)

_AUTO_CLASSES = {"question-answering": "AutoModelForQuestionAnswering",
                 "image-classification": "AutoModelForImageClassification",
                 "sequence-classification": "AutoModelForSequenceClassification"}


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

        auto = getattr(transformers, _AUTO_CLASSES[spec["task"]])
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


def _preprocessing(spec: dict[str, Any], recipe: Recipe) -> str:
    """The data section's preprocessing, with ``auto`` resolved by the model's library."""
    if spec["preprocessing"] != "auto":
        return spec["preprocessing"]
    return "transformers" if recipe.model["source"] == "transformers" else "timm"


def _image_processor(recipe: Recipe, built: BuiltModel) -> Any:
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
        return _ProcessorTransform(_image_processor(recipe, built))
    import timm.data

    if getattr(built.model, "pretrained_cfg", None) is None:
        raise RecipeError("preprocessing 'timm' needs a timm model (its pretrained_cfg gives size/mean/std); "
                          "pick another preprocessing")
    return timm.data.create_transform(**timm.data.resolve_model_data_config(built.model), is_training=False)


def _image_batches(spec: dict[str, Any], recipe: Recipe, built: BuiltModel, limit: int | None, batch_size: int, *,
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
        transform = _image_transform(_preprocessing(spec, recipe), recipe, built)
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
        transform = _image_transform(_preprocessing(spec, recipe), recipe, built)
        rows = iter(ds) if limit is None else itertools.islice(ds, limit)
        while chunk := list(itertools.islice(rows, batch_size)):
            # calibration needs no labels: an unlabeled image folder gives -1
            yield (torch.stack([transform(r[spec["image_column"]].convert("RGB")) for r in chunk]),
                   torch.tensor([int(r.get(spec["label_column"], -1)) for r in chunk]))


def _squad_examples(spec: dict[str, Any], limit: int | None) -> list:
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
        return squad_calibration_batches(_squad_examples(spec, None), built.tokenizer, spec["num_samples"],
                                         spec["batch_size"], max_length=spec["max_length"], stride=spec["stride"],
                                         seed=seed)
    if spec["source"] == "text":
        return _text_batches(spec, built, seed)
    batches = [x for x, _ in _image_batches(spec, recipe, built, spec["num_samples"], spec["batch_size"],
                                            shuffle_seed=seed)]
    if not batches:
        raise RecipeError("calibration data is empty")
    return batches


@dataclass
class Evaluator:
    """Scores models on the recipe's evaluation data in ``evaluate``'s format.

    Image classification gives ``{"accuracy": fraction}``, question answering ``{"exact_match", "f1"}`` in percent,
    both computed by our ``evaluate`` modules (``hf_adaquant.metrics``: ``top1_accuracy``, ``squad``).
    """

    recipe: Recipe
    built: BuiltModel

    num_evaluated: int | None = None  # samples (images or questions) scored by the last call

    @property
    def dataset(self) -> dict[str, Any]:
        """How the card and the results JSON describe the evaluation data."""
        spec = self.recipe.evaluation or {}
        source = spec["source"]
        default_name = spec.get("name") or (spec["path"].name if spec.get("path") is not None else source)
        default_type = {"cifar10_npz": "cifar10", "squad_json": "squad", "hf_squad": "squad"}.get(source,
                                                                                                   default_name)
        split = spec.get("split")
        if split is None and spec.get("articles"):
            split = f"articles {spec['articles'][0]}-{spec['articles'][-1]}"
        return {"name": str(spec.get("dataset_name") or default_name),
                "type": str(spec.get("dataset_type") or default_type), "split": split, "source": source,
                "num_samples": self.num_evaluated if self.num_evaluated is not None else spec["num_samples"]}

    def __call__(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        """Metrics per model name, every model seeing the same data."""
        spec = self.recipe.evaluation
        if spec is None:
            raise RecipeError("the recipe has no evaluation section")
        for model in models.values():
            model.eval()
        if spec["task"] == "question-answering":
            if self.built.tokenizer is None:
                raise RecipeError("question-answering evaluation needs a transformers model with a tokenizer")
            examples = _squad_examples(spec, spec["num_samples"])
            self.num_evaluated = len(examples)
            return {name: evaluate_squad_model(m, self.built.tokenizer, examples, batch_size=spec["batch_size"],
                                               max_length=spec["max_length"], stride=spec["stride"])
                    for name, m in models.items()}
        if self._uses_image_evaluator(models):
            return self._evaluate_with_image_evaluator(models)
        metrics = {name: load_metric("top1_accuracy") for name in models}
        total = 0
        with torch.no_grad():
            batches = _image_batches(spec, self.recipe, self.built, spec["num_samples"], spec["batch_size"])
            for x, y in progress_bar(batches, desc="eval", leave=False):
                for name, m in models.items():
                    out = m(x)
                    logits = out.logits if hasattr(out, "logits") else out
                    metrics[name].add_batch(predictions=logits.argmax(dim=-1), references=y)
                total += len(y)
        if total == 0:
            raise RecipeError("evaluation data is empty")
        self.num_evaluated = total
        return {name: {"accuracy": metric.compute()["accuracy"]} for name, metric in metrics.items()}

    def _uses_image_evaluator(self, models: dict[str, nn.Module]) -> bool:
        """``evaluate.evaluator("image-classification")`` where it fits: images (not tensors), the model's own image
        processor, transformers models with unique label names; our loop otherwise (timm, plain PyTorch)."""
        spec = self.recipe.evaluation
        return (spec["source"] in ("image_folder", "hf_image_dataset")
                and _preprocessing(spec, self.recipe) == "transformers"
                and all(supports_image_evaluator(m) for m in models.values()))

    def _evaluate_with_image_evaluator(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        spec = self.recipe.evaluation
        data = _image_dataset(spec, spec["num_samples"])
        if len(data) == 0:
            raise RecipeError("evaluation data is empty")
        processor = _image_processor(self.recipe, self.built)
        columns = ({"input_column": spec["image_column"], "label_column": spec["label_column"]}
                   if spec["source"] == "hf_image_dataset" else {})
        self.num_evaluated = len(data)
        return {name: {"accuracy": evaluate_image_classifier(m, data, processor, batch_size=spec["batch_size"],
                                                             **columns)["accuracy"]}
                for name, m in models.items()}


def _image_dataset(spec: dict[str, Any], limit: int | None) -> Any:
    """The evaluation images as a ``datasets.Dataset`` (what ``evaluate.evaluator`` takes), at most ``limit``."""
    import datasets

    if spec["source"] == "image_folder":
        folder = ImageFolderWithLabels(spec["path"], limit=limit)
        return datasets.Dataset.from_dict(
            {"image": [str(folder.folder / name) for name in folder.filenames], "label": folder.labels}
        ).cast_column("image", datasets.Image(mode="RGB"))
    ds = datasets.load_dataset(spec["name"], spec["config"], split=spec["split"], streaming=spec["streaming"])
    if not spec["streaming"]:
        return ds if limit is None else ds.select(range(min(limit, len(ds))))
    # a stream is written to Arrow files (datasets' cache), not held in memory: ImageNet val is 6 GB
    return datasets.Dataset.from_generator(_first_rows, gen_kwargs={"rows": ds, "limit": limit}, features=ds.features)


def _first_rows(rows: Any, limit: int | None) -> Iterator[dict[str, Any]]:
    yield from (rows if limit is None else itertools.islice(rows, limit))


def build_evaluator(recipe: Recipe, built: BuiltModel) -> Evaluator | None:
    """An :class:`Evaluator` for the recipe, or None when it has no evaluation section."""
    return None if recipe.evaluation is None else Evaluator(recipe, built)
