"""The config side of a checkpoint: which kind of model it is, and the ``quantization_config`` in config.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..config import AdaQuantConfig
from .embeddings import validate_embedding_description
from .layout import LAYOUT_VERSION, READABLE_LAYOUT_VERSIONS, describe_model, validate_layer_description
from .weights import CONFIG_NAME, WEIGHTS_DIGEST_KEY as _WEIGHTS_DIGEST_KEY, CheckpointError

__all__ = ["model_kind", "quantization_config_dict", "read_checkpoint_config", "validate_layout"]


def model_kind(model: nn.Module) -> str:
    """``"transformers"``, ``"timm"`` or ``"torch"``: which config format and skeleton factory apply."""
    try:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            return "transformers"
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    if type(model).__module__.startswith("timm.") and isinstance(getattr(model, "pretrained_cfg", None), dict):
        return "timm"
    return "torch"


def validate_layout(qconfig: Any, where: str) -> dict[str, Any]:
    """The ``checkpoint_layout`` of a saved ``quantization_config`` (dict or config object), checked.

    Raises:
        CheckpointError: not an adaquant config, no layout, or a layout version this library cannot read.
    """
    data = qconfig if isinstance(qconfig, dict) else getattr(qconfig, "to_dict", lambda: {})()
    if data.get("quant_method") != "adaquant":
        raise CheckpointError(f"{where}: quantization_config.quant_method is {data.get('quant_method')!r}, "
                              "expected 'adaquant'")
    layout = data.get("checkpoint_layout")
    if not isinstance(layout, dict) or "version" not in layout:
        raise CheckpointError(f"{where}: quantization_config has no checkpoint_layout (quantize-on-load config "
                              "without saved weights?)")
    if layout["version"] not in READABLE_LAYOUT_VERSIONS:
        raise CheckpointError(f"{where}: checkpoint layout version {layout['version']!r} is not supported by this "
                              f"hf_adaquant (reads versions up to {LAYOUT_VERSION}); upgrade hf-adaquant")
    for key in ("layers", "folded_batchnorms", "weights_file"):
        if key not in layout:
            raise CheckpointError(f"{where}: checkpoint_layout lacks {key!r}")
    if not isinstance(layout["layers"], dict) or not layout["layers"]:
        raise CheckpointError(f"{where}: checkpoint_layout.layers must be a non-empty object")
    for name, desc in layout["layers"].items():
        try:
            validate_layer_description(desc)
        except ValueError as exc:
            raise CheckpointError(f"{where}: checkpoint_layout.layers[{name!r}]: {exc}") from exc
    embeddings = layout.get("embeddings", {})
    if not isinstance(embeddings, dict):
        raise CheckpointError(f"{where}: checkpoint_layout.embeddings must be an object")
    for name, desc in embeddings.items():
        try:
            validate_embedding_description(desc)
        except ValueError as exc:
            raise CheckpointError(f"{where}: checkpoint_layout.embeddings[{name!r}]: {exc}") from exc
    folded = layout["folded_batchnorms"]
    if not isinstance(folded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in folded.items()):
        raise CheckpointError(f"{where}: checkpoint_layout.folded_batchnorms must map BatchNorm names to layer names")
    digest = layout.get(_WEIGHTS_DIGEST_KEY)
    if digest is not None and not isinstance(digest, str):
        raise CheckpointError(f"{where}: checkpoint_layout.{_WEIGHTS_DIGEST_KEY} must be a string")
    weights_file = layout["weights_file"]
    if not isinstance(weights_file, str) or not weights_file.endswith(".safetensors") or \
            Path(weights_file).name != weights_file or weights_file in (".", ".."):
        raise CheckpointError(f"{where}: checkpoint_layout.weights_file must be a .safetensors file name in the "
                              f"checkpoint folder, got {weights_file!r}")
    return layout


def read_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory, with a valid ``quantization_config``.

    Raises:
        CheckpointError: the file is missing, not JSON, or has no usable quantization_config.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; not a saved hf_adaquant checkpoint")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or "quantization_config" not in config:
        raise CheckpointError(f"{path}: has no quantization_config; not an hf_adaquant checkpoint")
    validate_layout(config["quantization_config"], str(path))
    return config


def quantization_config_dict(qmodel: nn.Module) -> dict[str, Any]:
    """The JSON ``quantization_config`` of a quantized model: its run's config plus the checkpoint layout."""
    report = getattr(qmodel, "hf_adaquant_report", None)
    if report is None:
        raise ValueError("the model has no hf_adaquant_report: save the model returned by hf_adaquant.quantize or "
                         "hf_adaquant.load_quantized")
    config = AdaQuantConfig.from_dict(report.config)
    data = config.to_dict()
    data["checkpoint_layout"] = describe_model(qmodel, getattr(report, "folded_batchnorms", {}) or {})
    return data
