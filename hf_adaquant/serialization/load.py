"""Load a checkpoint folder (local or from the Hub) back into a quantized model."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..report import QuantizationReport
from .checkpoint_config import read_checkpoint_config
from .embeddings import unpack_embedding
from .layout import WEIGHTS_NAME, apply_signed, layer_tensor_specs, quantize_skeleton_, unpack_layer
from .packed import freeze
from .weights import CONFIG_NAME, CheckpointError, check_weights_header, read_weights, verify_layer_tensors

__all__ = ["attach_report", "load_quantized", "load_state_into_", "register_checkpoint_loader",
           "register_load_finalizer", "resolve_checkpoint_dir"]


def resolve_checkpoint_dir(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local directory as is; otherwise a Hub repo id downloaded (config + weights) to the HF cache."""
    local = Path(path_or_repo_id)
    if local.is_dir():
        return local
    text = str(path_or_repo_id)
    if local.exists() or local.is_absolute() or text.startswith((".", "~")) or text.endswith(("/", "\\")):
        # a local path (a typo, or a file): asking the Hub about it would only give a confusing error
        raise CheckpointError(f"{local}: checkpoint folder not found")
    repo_id = text.removeprefix("hf-hub:")
    from huggingface_hub import snapshot_download

    allow = hub_kwargs.pop("allow_patterns", ["*.json", WEIGHTS_NAME, "*.txt", "*.model", "README.md"])
    return Path(snapshot_download(repo_id, allow_patterns=allow, **hub_kwargs))


def load_state_into_(model: nn.Module, tensors: dict[str, torch.Tensor], layout: dict[str, Any],
                     where: str) -> nn.Module:
    """Load stored ``tensors`` into a skeleton already given the quantized structure (strict)."""
    state: dict[str, torch.Tensor] = {}
    signed: dict[str, dict[str, bool]] = {}
    stored = dict(tensors)
    for name, desc in layout["layers"].items():
        prefix = f"{name}."
        own = {k[len(prefix):]: stored.pop(k) for k in [k for k in stored if k.startswith(prefix)]}
        try:
            layer_state, signed[name] = unpack_layer(own, desc, f"{where}: layer {name!r}")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        state.update({prefix + k: v for k, v in layer_state.items()})
        unknown = sorted(set(own) - set(layer_tensor_specs(desc)))
        if unknown:
            raise CheckpointError(f"{where}: layer {name!r} has unknown tensors {unknown}")
    for name, desc in layout.get("embeddings", {}).items():
        prefix = f"{name}."
        own = {k[len(prefix):]: stored.pop(k) for k in [k for k in stored if k.startswith(prefix)]}
        unknown = sorted(set(own) - {"weight_packed", "weight_scale", "weight_zero_point"})
        if unknown:
            raise CheckpointError(f"{where}: embedding {name!r} has unknown tensors {unknown}")
        try:
            table_state = unpack_embedding(own, desc, f"{where}: embedding {name!r}")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        state.update({prefix + k: v for k, v in table_state.items()})
    state.update(stored)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{where}: does not match the model: missing {result.missing_keys[:10]}, "
                              f"unexpected {result.unexpected_keys[:10]} (wrong architecture or model arguments?)")
    for name, flags in signed.items():
        apply_signed(model.get_submodule(name), flags)
    return model


def attach_report(model: nn.Module, qconfig: dict[str, Any]) -> None:
    """Give a loaded model the ``hf_adaquant_report`` a freshly quantized one has (so it can be saved again)."""
    config = {k: v for k, v in qconfig.items() if k != "checkpoint_layout"}
    layout = qconfig["checkpoint_layout"]
    plan = {name: [d["weight_bits"], d["activation_bits"]] for name, d in layout["layers"].items()}
    model.hf_adaquant_report = QuantizationReport(config=config, plan=plan,
                                                  folded_batchnorms=dict(layout["folded_batchnorms"]))


def _skeleton(directory: Path, config: dict[str, Any], model: nn.Module | None) -> nn.Module:
    if model is not None:
        return copy.deepcopy(model)
    if "architecture" in config:  # timm's config.json
        import timm

        return timm.create_model(f"local-dir:{directory}", pretrained=False)
    if "hf_adaquant_model_class" in config:
        raise CheckpointError(f"{directory / CONFIG_NAME}: a plain PyTorch model "
                              f"({config['hf_adaquant_model_class']}); pass a float skeleton: "
                              "load_quantized(path, model=MyModel(...))")
    raise CheckpointError(f"{directory / CONFIG_NAME}: neither a transformers nor a timm config")


# Checkpoints another library rebuilds itself (transformers' from_pretrained, through our HfQuantizer): the
# integration registers its loader here, so this layer never imports the integrations (dependency inversion).
CheckpointLoader = Callable[[Path, dict[str, Any]], nn.Module]
_CHECKPOINT_LOADERS: dict[str, CheckpointLoader] = {}


def register_checkpoint_loader(kind: str, loader: CheckpointLoader) -> CheckpointLoader:
    """Have :func:`load_quantized` (without ``model=``) rebuild checkpoints of ``kind`` with
    ``loader(directory, config_json)``; only ``"transformers"`` is looked up. Registering again replaces it."""
    _CHECKPOINT_LOADERS[kind] = loader
    return loader


# Integrations that add methods to loaded timm / plain models (save_pretrained, push_to_hub: integrations/hub_methods)
# register here, for the same reason.
_LOAD_FINALIZERS: dict[str, Callable[[nn.Module], Any]] = {}


def register_load_finalizer(finalizer: Callable[[nn.Module], Any]) -> Callable[[nn.Module], Any]:
    """Have :func:`load_quantized` call ``finalizer(model)`` on every timm / plain PyTorch model it rebuilds
    (transformers models come from their own loader). Registering the same function again replaces it."""
    _LOAD_FINALIZERS[f"{finalizer.__module__}.{finalizer.__qualname__}"] = finalizer
    return finalizer


def load_quantized(path_or_repo_id: str | os.PathLike, *, model: nn.Module | None = None,
                   device: str | torch.device = "cpu", packed: bool = False, **hub_kwargs: Any) -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`, from a directory or a Hub repo id.

    Args:
        path_or_repo_id: local directory, or Hub id (``"user/resnet18-w4"``, ``"hf-hub:user/..."``).
        model: float skeleton (same architecture and arguments) for plain PyTorch models; optional for timm and
            transformers checkpoints, whose config names the architecture. Not modified (a copy is used).
        device: where the loaded model goes.
        packed: keep the weights as packed integer codes in memory (:func:`hf_adaquant.freeze`), not float32.
        **hub_kwargs: passed to ``huggingface_hub.snapshot_download`` (``revision``, ``token``, ``cache_dir``,
            ``local_files_only``...).

    Returns:
        The quantized model in eval mode; its outputs equal those of the model that was saved.

    Raises:
        CheckpointError: a missing/corrupted file, an unknown layout version, a config.json and weights file that
            were not saved together (or were edited), stored tensors that do not fit the layer's bits, or a skeleton
            that does not match; naming the file (and the layer).
    """
    directory = resolve_checkpoint_dir(path_or_repo_id, **hub_kwargs)
    config = read_checkpoint_config(directory)
    qconfig = config["quantization_config"]
    layout = qconfig["checkpoint_layout"]
    weights_path = directory / layout["weights_file"]
    if model is None and "model_type" in config:  # transformers: its own loader, through our HfQuantizer
        loader = _CHECKPOINT_LOADERS.get("transformers")
        if loader is None:
            raise CheckpointError(f"{directory / CONFIG_NAME}: a transformers checkpoint, and no transformers loader "
                                  "is registered (import hf_adaquant, which registers it)")
        # a clear error on a truncated or foreign file before transformers opens it (the full check runs in the hook)
        check_weights_header(weights_path, layout)
        loaded = loader(directory, config)
        return (freeze(loaded) if packed else loaded).to(device).eval()
    tensors = read_weights(weights_path, layout=layout)
    verify_layer_tensors(tensors, layout, str(weights_path))
    skeleton = _skeleton(directory, config, model)
    where = str(weights_path)
    try:
        quantize_skeleton_(skeleton, layout, where)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    load_state_into_(skeleton, tensors, layout, where)
    attach_report(skeleton, qconfig)
    for p in skeleton.parameters():
        p.requires_grad_(False)
    loaded = (freeze(skeleton) if packed else skeleton).to(device).eval()
    for finalizer in _LOAD_FINALIZERS.values():
        finalizer(loaded)
    return loaded
