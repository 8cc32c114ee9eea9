"""The recipe a command line without ``--recipe`` stands for: ``-m MODEL --weights int4 --dataset DATA ...``.

:func:`recipe_for_model` writes the same sections a recipe file holds, so the run, the saved ``recipe.yaml`` and
the model card are those of a recipe run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import PIPELINES
from .schema import TRANSFORMERS_TASKS, RecipeError

__all__ = ["parse_bits", "recipe_for_model"]

# transformers architecture suffix -> the recipe task that loads it
_ARCHITECTURE_TASKS = {"ForQuestionAnswering": "question-answering",
                       "ForImageClassification": "image-classification",
                       "ForSequenceClassification": "sequence-classification"}


def parse_bits(text: str | int | None, what: str) -> int | None:
    """``"int4"``, ``"4"``, ``"w4"``/``"a8"`` -> 4/8; ``"none"``/``"fp32"``/``"float"`` -> None (kept float).

    Raises:
        RecipeError: anything else.
    """
    if text is None or isinstance(text, int):
        return text
    value = text.strip().lower()
    if value in ("none", "fp32", "float", "float32"):
        return None
    digits = value.removeprefix("int").removeprefix("uint").lstrip("wa")
    if not digits.isdigit():
        raise RecipeError(f"{what} must look like int4, int8, 4 or none, got {text!r}")
    return int(digits)


def _local_config(model: str) -> dict[str, Any] | None:
    path = Path(model).expanduser() / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _library(model: str, library: str | None) -> str:
    if library is not None:
        return library
    config = _local_config(model)
    if config is not None:
        return "timm" if "architecture" in config else "transformers"
    return "timm" if model.startswith(("timm/", "hf-hub:")) else "transformers"


def _task(model: str, task: str | None) -> str:
    if task is not None:
        return task
    config = _local_config(model) or {}
    for architecture in config.get("architectures") or []:
        for suffix, name in _ARCHITECTURE_TASKS.items():
            if architecture.endswith(suffix):
                return name
    raise RecipeError(f"cannot tell the task of {model!r}: pass --task (one of {list(TRANSFORMERS_TASKS)})")


def _dataset_name(dataset: str) -> str:
    """A local file or folder made absolute (the saved recipe works from anywhere); a Hub name as given."""
    path = Path(dataset).expanduser()
    return str(path.resolve()) if path.exists() else dataset


def recipe_for_model(model: str, *, dataset: str, num_samples: int = 128, task: str | None = None,
                     library: str | None = None, weights: str | int = 4, activations: str | int | None = 8,
                     pipeline: str = "advanced", dataset_config: str | None = None, dataset_split: str = "train",
                     text_column: str | None = None, batch_size: int = 32, revision: str | None = None,
                     trust_remote_code: bool = False) -> dict[str, Any]:
    """A raw recipe (for :func:`parse_recipe`) quantizing ``model`` with calibration data ``dataset``.

    Args:
        model: a Hub id (``timm/...`` or ``hf-hub:...`` ids are timm models) or a local model folder.
        dataset: calibration data: an image folder or Hub image dataset for vision models; a ``.json``/``.jsonl``
            file, folder or Hub text dataset for transformers text models.
        task: transformers task (default: from the folder's ``config.json`` ``architectures``).
        library: ``"timm"`` or ``"transformers"`` (default: guessed from the id or the folder).
        weights / activations: bit-widths (``int4``, ``8``; activations ``none`` keeps them float).
        revision / trust_remote_code: passed to the loaders (trust_remote_code only for transformers).

    Raises:
        RecipeError: an unknown library, pipeline or task, or a combination this route cannot build.

    Example:
        >>> raw = recipe_for_model("timm/resnet18.a1_in1k", dataset="calib_images/", weights="int4")
    """
    library = _library(model, library)
    if pipeline not in PIPELINES:
        raise RecipeError(f"--pipeline must be one of {PIPELINES}, got {pipeline!r}")
    quantization = {"weight_bits": parse_bits(weights, "--weights"),
                    "activation_bits": parse_bits(activations, "--activations"), "pipeline": pipeline}
    local = Path(model).expanduser()
    if library == "timm":
        if trust_remote_code:
            raise RecipeError("--trust-remote-code applies to transformers models only")
        name = f"local-dir:{local.resolve()}" if local.is_dir() else (
            model if model.startswith("hf-hub:") else f"hf-hub:{model}")
        model_spec: dict[str, Any] = {"source": "timm", "name": name, "pretrained": True, "revision": revision}
        task = "image-classification"
    elif library == "transformers":
        task = _task(model, task)
        model_spec = {"source": "transformers", "id": str(local.resolve()) if local.is_dir() else model,
                      "task": task, "revision": revision, "trust_remote_code": trust_remote_code}
    else:
        raise RecipeError(f"--library must be 'timm' or 'transformers', got {library!r}")
    if task == "image-classification":  # preprocessing "auto": timm's data config, or the transformers processor
        calibration: dict[str, Any] = {"source": "hf_image_dataset", "name": _dataset_name(dataset), "split": dataset_split,
                                       "config": dataset_config, "streaming": False}
    else:
        calibration = {"source": "text", "name": _dataset_name(dataset), "split": dataset_split, "config": dataset_config,
                       "text_column": text_column}
    calibration.update(num_samples=num_samples, batch_size=batch_size)
    name = (local.name if local.is_dir() else model.rsplit("/", 1)[-1].removeprefix("hf-hub:"))
    bits = f"w{quantization['weight_bits']}a{quantization['activation_bits'] or 'fp'}"
    return {"name": f"{name}-{bits}", "description": f"hf-adaquant quantize -m {model} (no recipe file)",
            "model": model_spec, "calibration": calibration, "quantization": quantization}
