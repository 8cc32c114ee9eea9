"""The evaluation a recipe names: an :class:`Evaluator` that scores models on the recipe's evaluation data."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from ..data import ImageFolderWithLabels
from ..integrations.image_evaluator import evaluate_image_classifier, supports_image_evaluator
from ..metrics import load_metric
from ..tasks.squad import evaluate_squad_model
from ..utils.logging import progress_bar
from .build import BuiltModel, get_image_processor, image_batches, preprocessing_of, squad_examples
from .schema import Recipe, RecipeError

__all__ = ["Evaluator", "build_evaluator"]


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
            examples = squad_examples(spec, spec["num_samples"])
            self.num_evaluated = len(examples)
            return {name: evaluate_squad_model(m, self.built.tokenizer, examples, batch_size=spec["batch_size"],
                                               max_length=spec["max_length"], stride=spec["stride"])
                    for name, m in models.items()}
        if self._uses_image_evaluator(models):
            return self._evaluate_with_image_evaluator(models)
        metrics = {name: load_metric("top1_accuracy") for name in models}
        total = 0
        with torch.no_grad():
            batches = image_batches(spec, self.recipe, self.built, spec["num_samples"], spec["batch_size"])
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
                and preprocessing_of(spec, self.recipe) == "transformers"
                and all(supports_image_evaluator(m) for m in models.values()))

    def _evaluate_with_image_evaluator(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        spec = self.recipe.evaluation
        data = _image_dataset(spec, spec["num_samples"])
        if len(data) == 0:
            raise RecipeError("evaluation data is empty")
        processor = get_image_processor(self.recipe, self.built)
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
