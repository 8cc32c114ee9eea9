"""Recipe files: what a quantization run needs (model, calibration data, evaluation, ``AdaQuantConfig``) in YAML.

A recipe has four sections. ``model`` and ``calibration``/``evaluation`` each pick a ``source`` whose keys are
listed in :data:`MODEL_SOURCES` / :data:`DATA_SOURCES`; ``quantization`` holds ``AdaQuantConfig`` fields, and
optionally ``policy``: the name of a model-family policy (:data:`hf_adaquant.policies.POLICIES`, e.g. ``bert-qa``)
that builds the config from those fields::

    name: cifar10-resnet20-w4a4
    model: {source: cifar_resnet, depth: 20, checkpoint: ${shared}/models/cifar10-resnet/resnet20-12fca82f.th}
    calibration: {source: cifar10_npz, path: ${shared}/data/cifar10/calib.npz, num_samples: 1000, batch_size: 100}
    evaluation: {task: image-classification, source: cifar10_npz, path: ${shared}/data/cifar10/test.npz}
    quantization: {weight_bits: 4, activation_bits: 4, pipeline: advanced}

Paths may start with ``${shared}`` (the offline models/data folder, :func:`hf_adaquant.data.shared_dir`) or
``${project}`` (the source checkout); other relative paths are relative to the recipe file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..config import FLOAT_FIELDS, AdaQuantConfig
from ..data.paths import repo_root, shared_dir
from ..policies import POLICIES, policy_config

__all__ = ["DATA_SOURCES", "MODEL_SOURCES", "TASKS", "Recipe", "RecipeError", "numbers_from_text", "parse_articles",
           "parse_recipe", "resolve_path"]

REQUIRED = object()
PATH = "path"  # field kind: a file or folder, resolved and (optionally) checked to exist
Field = tuple[Any, Any]  # (type, default or REQUIRED)

MODEL_SOURCES: dict[str, dict[str, Field]] = {
    "timm": {"name": (str, REQUIRED), "pretrained": (bool, True), "checkpoint": (PATH, None), "kwargs": (dict, {}),
             "revision": (str, None)},
    # trust_remote_code runs code from the model's repository: off unless the recipe (or --trust-remote-code) says so
    "transformers": {"id": (str, REQUIRED), "task": (str, REQUIRED), "dtype": (str, "float32"),
                     "revision": (str, None), "trust_remote_code": (bool, False)},
    "cifar_resnet": {"depth": (int, REQUIRED), "checkpoint": (PATH, REQUIRED)},
    "efficientnet_lite0": {},
    "factory": {"callable": (str, REQUIRED), "kwargs": (dict, {})},
}
TRANSFORMERS_TASKS = ("question-answering", "image-classification", "sequence-classification")

_COMMON_DATA: dict[str, Field] = {"num_samples": (int, None), "batch_size": (int, 32)}
DATA_SOURCES: dict[str, dict[str, Field]] = {
    "cifar10_npz": {"path": (PATH, REQUIRED)},
    "image_folder": {"path": (PATH, REQUIRED), "preprocessing": (str, "auto")},
    "hf_image_dataset": {"name": (str, REQUIRED), "split": (str, REQUIRED), "config": (str, None),
                         "image_column": (str, "image"), "label_column": (str, "label"),
                         "preprocessing": (str, "auto"), "streaming": (bool, True)},
    "squad_json": {"path": (PATH, REQUIRED), "articles": ((str, list), None), "max_length": (int, 384),
                   "stride": (int, 128)},
    "hf_squad": {"name": (str, "rajpurkar/squad"), "split": (str, REQUIRED), "config": (str, None),
                 "max_length": (int, 384), "stride": (int, 128)},
    "synthetic": {"shape": (list, REQUIRED), "num_classes": (int, 10), "seed": (int, 0)},
    # texts for calibrating transformers text models: a Hub dataset name, a local .json/.jsonl file or a folder
    "text": {"name": (str, REQUIRED), "split": (str, "train"), "config": (str, None), "text_column": (str, None),
             "max_length": (int, 128)},
}
# Image preprocessing: "timm" (the model's data config), "transformers" (the model's AutoImageProcessor; evaluation
# then runs through evaluate.evaluator), "auto" (transformers for transformers models, else timm).
PREPROCESSING = ("auto", "timm", "transformers", "efficientnet_lite0")
# Evaluation tasks and the data sources that can feed them.
TASKS: dict[str, tuple[str, ...]] = {
    "image-classification": ("cifar10_npz", "image_folder", "hf_image_dataset", "synthetic"),
    "question-answering": ("squad_json", "hf_squad"),
}
_TOP_LEVEL = ("name", "description", "model", "calibration", "evaluation", "quantization")


class RecipeError(ValueError):
    """A recipe is malformed; the message names the file and the offending key."""


@dataclass
class Recipe:
    """A validated recipe. Sections are dicts with every key filled in (defaults applied, paths resolved)."""

    name: str
    description: str
    model: dict[str, Any]
    calibration: dict[str, Any]
    evaluation: dict[str, Any] | None
    quantization: AdaQuantConfig
    path: Path | None
    raw: dict[str, Any]  # as written (after overrides): what gets saved next to a checkpoint

    @property
    def base_model_id(self) -> str | None:
        """Hub id of the float model (model card ``base_model``), when it comes from the Hub."""
        spec = self.model
        if spec["source"] == "transformers":
            return None if Path(spec["id"]).is_absolute() else spec["id"]
        if spec["source"] == "timm" and spec["pretrained"] and spec["checkpoint"] is None \
                and not spec["name"].startswith("local-dir:"):
            name = spec["name"].removeprefix("hf-hub:").removeprefix("hf_hub:")
            # a bare "arch.tag" name is timm's pretrained tag, published as timm/<arch>.<tag>
            return name if "/" in name else (f"timm/{name}" if "." in name else None)
        return None

    def to_yaml(self) -> str:
        """The recipe as YAML, with plain relative paths made absolute so the copy works from anywhere."""
        raw = copy.deepcopy(self.raw)
        for section in ("model", "calibration", "evaluation"):
            data, normalized = raw.get(section), getattr(self, section)
            if not isinstance(data, dict) or normalized is None:
                continue
            for key, value in data.items():
                is_path = isinstance(normalized.get(key), Path) or (section == "model" and key == "id" and
                                                                   value.startswith((".", "~")))
                if isinstance(value, str) and is_path and not value.startswith("${"):
                    data[key] = str(normalized[key])
        return yaml.safe_dump(raw, sort_keys=False)


def resolve_path(value: str, base: Path | None, where: str, *, strict: bool = True) -> Path:
    """Resolve ``${shared}/...``, ``${project}/...``, ``~`` and paths relative to ``base``.

    Without the shared folder a ``${shared}`` path raises, unless ``strict`` is False (then it stays as written:
    enough to validate a recipe's structure on a machine without the offline data).
    """
    for var, root in (("${shared}", None), ("${project}", repo_root())):
        if value.startswith(var):
            if var == "${shared}":
                root = shared_dir()
                if root is None and not strict:
                    return Path(value)
                if root is None:
                    raise RecipeError(f"{where}: {value!r} needs the shared models/data folder, which was not "
                                      "found (set HF_ADAQUANT_SHARED)")
            return (root / value[len(var):].lstrip("/\\")).resolve()
    path = Path(value).expanduser()
    return path if path.is_absolute() else ((base or Path.cwd()) / path).resolve()


def _type_name(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("path" if k == PATH else k.__name__ for k in kinds)


def _check_section(data: Any, spec: dict[str, Field], where: str, base: Path | None, check_files: bool,
                   extra: Sequence[str] = ()) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    allowed = set(spec) | {"source", *extra}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; accepted: {sorted(allowed)}")
    out: dict[str, Any] = {"source": data.get("source")}
    for key, (kind, default) in spec.items():
        if key not in data or data[key] is None:
            if default is REQUIRED:
                raise RecipeError(f"{where}: missing required key {key!r}")
            out[key] = copy.deepcopy(default)
            continue
        value = data[key]
        py_kind = str if kind == PATH else kind
        if not isinstance(value, py_kind) or (py_kind is int and isinstance(value, bool)):
            raise RecipeError(f"{where}.{key} must be {_type_name(kind)}, got {value!r}")
        if kind == PATH:
            value = resolve_path(value, base, f"{where}.{key}", strict=check_files)
            if check_files and not value.exists():
                raise RecipeError(f"{where}.{key}: file not found: {value} (from {data[key]!r})")
        out[key] = value
    return out


def _source(data: Any, where: str, choices: Mapping[str, Any]) -> str:
    source = data.get("source") if isinstance(data, Mapping) else None
    if source not in choices:
        raise RecipeError(f"{where}.source must be one of {sorted(choices)}, got {source!r}")
    return source


def parse_articles(value: str | list, where: str) -> list[int]:
    """SQuAD article indices from ``"0-39"`` (inclusive range), ``"40,41"`` or a list of integers."""
    if isinstance(value, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise RecipeError(f"{where} must list non-negative integers, got {value!r}")
        return list(value)
    out: list[int] = []
    for part in value.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise RecipeError(f"{where} must look like '0-39' or '40,41', got {value!r}")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return out


def _check_data(data: Any, where: str, base: Path | None, check_files: bool, extra: dict[str, Field]
                ) -> dict[str, Any]:
    source = _source(data, where, DATA_SOURCES)
    spec = {**DATA_SOURCES[source], **_COMMON_DATA, **extra}
    out = _check_section(data, spec, where, base, check_files)
    for key in ("num_samples", "batch_size"):
        if out[key] is not None and out[key] < 1:
            raise RecipeError(f"{where}.{key} must be >= 1, got {out[key]}")
    if "preprocessing" in out and out["preprocessing"] not in PREPROCESSING:
        raise RecipeError(f"{where}.preprocessing must be one of {PREPROCESSING}, got {out['preprocessing']!r}")
    if out.get("articles") is not None:
        out["articles"] = parse_articles(out["articles"], f"{where}.articles")
    if source == "synthetic" and not all(isinstance(d, int) and d > 0 for d in out["shape"]):
        raise RecipeError(f"{where}.shape must be a list of positive integers, got {out['shape']!r}")
    return out


def parse_recipe(raw: Mapping[str, Any], *, path: Path | None = None, check_files: bool = True) -> Recipe:
    """Validate a recipe dict (as read from YAML) and fill in defaults.

    Args:
        raw: the recipe.
        path: the file it came from (relative paths resolve against its folder; errors name it).
        check_files: require local files and folders named by the recipe to exist.

    Raises:
        RecipeError: naming the file and key of the first problem found.
    """
    origin = str(path) if path is not None else "recipe"
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{origin}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_TOP_LEVEL))
    if unknown:
        raise RecipeError(f"{origin}: unknown top-level key(s) {unknown}; accepted: {list(_TOP_LEVEL)}")
    for key in ("model", "calibration"):
        if key not in raw:
            raise RecipeError(f"{origin}: missing required section {key!r}")
    base = path.parent if path is not None else None
    model = _check_section(raw["model"], MODEL_SOURCES[_source(raw["model"], f"{origin}: model", MODEL_SOURCES)],
                           f"{origin}: model", base, check_files)
    if model["source"] == "transformers":
        if model["task"] not in TRANSFORMERS_TASKS:
            raise RecipeError(f"{origin}: model.task must be one of {TRANSFORMERS_TASKS}, got {model['task']!r}")
        if model["id"].startswith(("${", ".", "/", "~")):  # a local folder rather than a Hub id
            model["id"] = str(_check_section({"id": model["id"]}, {"id": (PATH, REQUIRED)}, f"{origin}: model",
                                             base, check_files)["id"])
    calibration = _check_data(raw["calibration"], f"{origin}: calibration", base, check_files,
                              {"num_samples": (int, REQUIRED)})
    evaluation = None
    if raw.get("evaluation") is not None:
        evaluation = _check_data(raw["evaluation"], f"{origin}: evaluation", base, check_files,
                                 {"task": (str, REQUIRED), "compare_fp": (bool, True),
                                  "dataset_name": (str, None), "dataset_type": (str, None)})
        task, source = evaluation["task"], evaluation["source"]
        if task not in TASKS:
            raise RecipeError(f"{origin}: evaluation.task must be one of {sorted(TASKS)}, got {task!r}")
        if source not in TASKS[task]:
            raise RecipeError(f"{origin}: evaluation.source {source!r} cannot feed task {task!r}; "
                              f"use one of {TASKS[task]}")
    quant = raw.get("quantization") or {}
    if not isinstance(quant, Mapping):
        raise RecipeError(f"{origin}: quantization must be a mapping of AdaQuantConfig fields")
    fields = numbers_from_text(quant)
    policy = fields.pop("policy", None)
    if policy is not None and policy not in POLICIES:
        raise RecipeError(f"{origin}: quantization.policy must be one of {sorted(POLICIES)}, got {policy!r}")
    try:
        # a named policy (hf_adaquant.policies) builds the config from the other fields: its rules live only there
        config = policy_config(policy, **fields) if policy is not None else AdaQuantConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{origin}: quantization: {err}") from None
    name = raw.get("name", path.stem if path is not None else "recipe")
    return Recipe(name=str(name), description=str(raw.get("description", "")), model=model,
                  calibration=calibration, evaluation=evaluation, quantization=config, path=path,
                  raw=copy.deepcopy(dict(raw)))


def numbers_from_text(quant: Mapping[str, Any]) -> dict[str, Any]:
    """``quantization`` fields with numbers written as text made numbers (float fields only).

    YAML 1.1 (PyYAML) reads ``1e-3`` (an exponent without a dot) as the string ``"1e-3"``; in a recipe or a
    ``--set quantization.lr_weight=1e-3`` override that is meant as a number. Anything that is not a number is
    left for :class:`AdaQuantConfig` to reject, naming the field.
    """
    out = dict(quant)
    for name in FLOAT_FIELDS:
        if isinstance(out.get(name), str):
            try:
                out[name] = float(out[name])
            except ValueError:
                pass
    return out
