"""Read what a model card needs from a saved AdaQuant checkpoint folder (no model is built).

The folder holds ``config.json`` with a ``quantization_config`` dict and one or more ``*.safetensors`` files,
plus optional side-cars written by the CLI: ``eval_results.json`` (FP vs quantized metrics, sizes) and
``recipe.yaml`` (the recipe that produced it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..utils.mapping_files import read_mapping

__all__ = ["EVAL_RESULTS_FILE", "LAYER_BITS_KEYS", "RECIPE_FILE", "CheckpointInfo", "layer_bits_from_config",
           "read_checkpoint_info"]

EVAL_RESULTS_FILE = "eval_results.json"
"""Side-car with ``{"task", "dataset": {...}, "fp32": {metric: value}, "quantized": {...}, "size": {...}}``."""
RECIPE_FILE = "recipe.yaml"
"""Side-car with the (resolved) recipe the checkpoint was made with."""

# Keys under which a per-layer bit assignment may be stored in ``quantization_config`` (the serializer's
# layout may evolve; the card only needs ``{layer: (weight_bits, activation_bits)}``).
LAYER_BITS_KEYS = ("plan", "layer_bits", "bits_per_layer", "per_layer_bits", "layers", "modules")


@dataclass
class CheckpointInfo:
    """What a saved checkpoint folder says about itself."""

    path: Path
    config: dict[str, Any]
    quantization_config: dict[str, Any]
    layer_bits: dict[str, tuple[int | None, int | None]]
    weight_files: dict[str, int]  # file name -> bytes
    eval_results: dict[str, Any] | None = None
    recipe_text: str | None = None

    @property
    def checkpoint_bytes(self) -> int:
        return sum(self.weight_files.values())

    @property
    def library(self) -> str:
        """"transformers", "timm" or "torch" (how the float architecture is described in ``config.json``)."""
        if "model_type" in self.config or "architectures" in self.config:
            return "transformers"
        if "architecture" in self.config:
            return "timm"
        return "torch"


def _bits_pair(value: Any) -> tuple[int | None, int | None] | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value, None
    if isinstance(value, (list, tuple)) and 1 <= len(value) <= 2 and all(v is None or isinstance(v, int)
                                                                        for v in value):
        return (value[0], value[1] if len(value) == 2 else None)
    if isinstance(value, Mapping):
        w = next((value[k] for k in ("weight_bits", "wbits", "weights", "w") if k in value), None)
        a = next((value[k] for k in ("activation_bits", "abits", "activations", "a") if k in value), None)
        if isinstance(w, int) and (a is None or isinstance(a, int)):
            return w, a
    return None


def layer_bits_from_config(qcfg: Mapping[str, Any]) -> dict[str, tuple[int | None, int | None]]:
    """Per-layer ``(weight_bits, activation_bits)`` from a ``quantization_config`` dict.

    Looks for a mapping ``{layer: bits}`` under the known keys, at the top level or one level down (e.g.
    ``{"config": {"layer_bits": ...}}``); values may be ``[w, a]``, ``w`` or ``{"weight_bits", "activation_bits"}``.
    Returns ``{}`` when no per-layer assignment is recorded.
    """
    # The serializer's ``checkpoint_layout.layers`` describes what was stored: it wins over run settings such as
    # ``layer_bits`` (only the overrides a run was given).
    nested = [v for v in qcfg.values() if isinstance(v, Mapping)]
    scopes: list[Mapping[str, Any]] = sorted(nested, key=lambda v: "layers" not in v) + [qcfg]
    for scope in scopes:
        for key in LAYER_BITS_KEYS:
            table = scope.get(key)
            if isinstance(table, Mapping) and table:
                pairs = {str(name): _bits_pair(v) for name, v in table.items()}
                if all(p is not None for p in pairs.values()):
                    return pairs  # type: ignore[return-value]
    return {}


def read_checkpoint_info(save_dir: str | Path) -> CheckpointInfo:
    """Inspect a checkpoint folder written by ``hf_adaquant.save_quantized``.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its safetensors weights are missing.
        ValueError: ``config.json`` has no AdaQuant ``quantization_config``.
    """
    path = Path(save_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a saved hf_adaquant checkpoint")
    config = read_mapping(config_path, "json")
    qcfg = config.get("quantization_config")
    if not isinstance(qcfg, dict):
        raise ValueError(f"{config_path} has no 'quantization_config': not a quantized checkpoint")
    method = qcfg.get("quant_method", "adaquant")
    if str(getattr(method, "value", method)).lower() != "adaquant":
        raise ValueError(f"{config_path}: quant_method is {method!r}, expected 'adaquant'")
    weights = {p.name: p.stat().st_size for p in sorted(path.glob("*.safetensors"))}
    if not weights:
        raise FileNotFoundError(f"{path} has no *.safetensors weights file")
    eval_path = path / EVAL_RESULTS_FILE
    recipe_path = path / RECIPE_FILE
    return CheckpointInfo(
        path=path, config=config, quantization_config=qcfg, layer_bits=layer_bits_from_config(qcfg),
        weight_files=weights, eval_results=read_mapping(eval_path, "json") if eval_path.is_file() else None,
        recipe_text=recipe_path.read_text() if recipe_path.is_file() else None)
