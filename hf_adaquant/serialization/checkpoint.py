"""Save a quantized model as a compact checkpoint and load it back (transformers, timm or plain PyTorch).

A checkpoint directory holds ``config.json`` (the model's own config: transformers' or timm's, or ours for plain
modules, with ``quantization_config`` added) and ``adaquant_model.safetensors`` (packed codes + float tensors of
the layers left in float). Only safetensors is read: no pickle. The weights file carries a SHA-256 of its tensors
in its metadata so a corrupted file is reported, not loaded.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import QModuleMixin
from .layout import (LAYOUT_VERSION, WEIGHTS_NAME, apply_signed, describe_model, pack_layer, quantize_skeleton_,
                     unpack_layer)

__all__ = ["CONFIG_NAME", "CheckpointError", "load_quantized", "model_kind", "quantization_config_dict",
           "read_checkpoint_config", "read_weights", "save_quantized", "validate_layout"]

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
_DIGEST_KEY = "hf_adaquant_sha256"
# What transformers / timm load as float weights from a folder (sharded checkpoints need their index file).
_FLOAT_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, truncated or of an unknown layout version."""


# ----------------------------------------------------------------------------------------------------------- kinds
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


# -------------------------------------------------------------------------------------------- tensors <-> file
def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", "hf_adaquant_layout": str(LAYOUT_VERSION),
                                            _DIGEST_KEY: _digest(tensors)})


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of an ``adaquant_model.safetensors`` file, checked against the digest in its metadata.

    Raises:
        CheckpointError: the file is missing, not a safetensors file, truncated, or its content changed.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError / RuntimeError by failure
        raise CheckpointError(f"{path}: corrupted or truncated safetensors file ({type(exc).__name__}: {exc})") from exc
    expected = metadata.get(_DIGEST_KEY)
    if expected is None:
        raise CheckpointError(f"{path}: not an hf_adaquant weights file (no {_DIGEST_KEY} in its metadata)")
    if _digest(tensors) != expected:
        raise CheckpointError(f"{path}: corrupted (the tensors do not match the SHA-256 recorded when saved)")
    return tensors


# ------------------------------------------------------------------------------------------------------ configs
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
    if layout["version"] != LAYOUT_VERSION:
        raise CheckpointError(f"{where}: checkpoint layout version {layout['version']!r} is not supported by this "
                              f"hf_adaquant (reads version {LAYOUT_VERSION}); upgrade hf-adaquant")
    for key in ("layers", "folded_batchnorms", "weights_file"):
        if key not in layout:
            raise CheckpointError(f"{where}: checkpoint_layout lacks {key!r}")
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
    from ..config import AdaQuantConfig

    report = getattr(qmodel, "hf_adaquant_report", None)
    if report is None:
        raise ValueError("the model has no hf_adaquant_report: save the model returned by hf_adaquant.quantize or "
                         "hf_adaquant.load_quantized")
    config = AdaQuantConfig.from_dict(report.config)
    data = config.to_dict()
    data["checkpoint_layout"] = describe_model(qmodel, getattr(report, "folded_batchnorms", {}) or {})
    return data


# --------------------------------------------------------------------------------------------------------- save
def model_tensors(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to store: float state of the layers left in float, packed form of the quantized ones."""
    qlayers = {name: m for name, m in qmodel.named_modules() if isinstance(m, QModuleMixin)}
    prefixes = tuple(f"{name}." for name in qlayers)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in qmodel.state_dict().items():
        if not key.startswith(prefixes):
            # clone: tied parameters share storage, which safetensors refuses
            tensors[key] = value.detach().cpu().clone()
    for name, module in qlayers.items():
        for suffix, tensor in pack_layer(module).items():
            tensors[f"{name}.{suffix}"] = tensor
    return tensors


def _write_config(qmodel: nn.Module, kind: str, qconfig: dict[str, Any], directory: Path,
                  base_model_config: Any) -> None:
    path = directory / CONFIG_NAME
    if kind == "transformers":
        config = copy.deepcopy(base_model_config if base_model_config is not None and not isinstance(
            base_model_config, dict) else qmodel.config)
        config.architectures = [type(qmodel).__name__]
        config.quantization_config = qconfig
        if isinstance(base_model_config, dict):
            config.update(base_model_config)
        config.save_pretrained(str(directory))
        generation_config = getattr(qmodel, "generation_config", None)
        if generation_config is not None and getattr(qmodel, "can_generate", lambda: False)():
            generation_config.save_pretrained(str(directory))
    elif kind == "timm":
        from timm.models._hub import save_config_for_hf

        model_config = dict(base_model_config or {})
        model_config["quantization_config"] = qconfig
        save_config_for_hf(qmodel, str(path), model_config=model_config)
    else:
        config = dict(base_model_config or {})
        config["hf_adaquant_model_class"] = f"{type(qmodel).__module__}.{type(qmodel).__qualname__}"
        config["quantization_config"] = qconfig
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_quantized(qmodel: nn.Module, save_dir: str | os.PathLike, *, base_model_config: Any = None) -> Path:
    """Write ``qmodel`` (from :func:`hf_adaquant.quantize`) as a compact checkpoint directory.

    Args:
        qmodel: a quantized transformers, timm or plain PyTorch model.
        save_dir: target directory; replaced atomically (files are written to a temp dir, then renamed).
        base_model_config: transformers: a ``PretrainedConfig`` to write instead of ``qmodel.config`` or a dict of
            overrides; timm: timm's ``model_config`` (extra keys, ``model_args``); plain modules: extra JSON keys
            (e.g. the arguments of the skeleton factory).

    Returns:
        The checkpoint directory.

    Example:
        >>> qmodel = quantize(model, batches, AdaQuantConfig(weight_bits=4))
        >>> save_quantized(qmodel, "out")          # then load_quantized("out") or AutoModelFor...("out")
    """
    save_dir = Path(save_dir)
    kind = model_kind(qmodel)
    qconfig = quantization_config_dict(qmodel)
    tensors = model_tensors(qmodel)
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.", dir=save_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a saved model is an ordinary folder
    try:
        write_weights(tensors, tmp / WEIGHTS_NAME)
        _write_config(qmodel, kind, qconfig, tmp, base_model_config)
        if save_dir.exists():
            # keep unrelated files (tokenizer, README) that callers put there
            for item in tmp.iterdir():
                os.replace(item, save_dir / item.name)
            # float weights left there would load silently (as the float model) where hf_adaquant is not imported
            for float_name in _FLOAT_WEIGHT_NAMES:
                stale = save_dir / float_name
                if stale.exists():
                    _logger.warning("%s: removing float weights next to the quantized checkpoint", stale)
                    stale.unlink()
            tmp.rmdir()
        else:
            os.replace(tmp, save_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _logger.info("saved %s quantized checkpoint to %s", kind, save_dir)
    return save_dir


# --------------------------------------------------------------------------------------------------------- load
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
        layer_state, signed[name] = unpack_layer(own, desc, f"{where}: layer {name!r}")
        state.update({prefix + k: v for k, v in layer_state.items()})
        unknown = sorted(set(own) - {"weight_packed", "weight_scale", "weight_zero_point", "weight_signed", "bias",
                                     "input_scale", "input_zero_point", "input_signed"})
        if unknown:
            raise CheckpointError(f"{where}: layer {name!r} has unknown tensors {unknown}")
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
    from ..quantize import QuantizationReport

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


def load_quantized(path_or_repo_id: str | os.PathLike, *, model: nn.Module | None = None,
                   device: str | torch.device = "cpu", **hub_kwargs: Any) -> nn.Module:
    """Rebuild a quantized model saved by :func:`save_quantized`, from a directory or a Hub repo id.

    Args:
        path_or_repo_id: local directory, or Hub id (``"user/resnet18-w4"``, ``"hf-hub:user/..."``).
        model: float skeleton (same architecture and arguments) for plain PyTorch models; optional for timm and
            transformers checkpoints, whose config names the architecture. Not modified (a copy is used).
        device: where the loaded model goes.
        **hub_kwargs: passed to ``huggingface_hub.snapshot_download`` (``revision``, ``token``, ``cache_dir``,
            ``local_files_only``...).

    Returns:
        The quantized model in eval mode; its outputs equal those of the model that was saved.

    Raises:
        CheckpointError: a missing/corrupted file, an unknown layout version or a skeleton that does not match,
            naming the file.
    """
    directory = resolve_checkpoint_dir(path_or_repo_id, **hub_kwargs)
    config = read_checkpoint_config(directory)
    qconfig = config["quantization_config"]
    layout = qconfig["checkpoint_layout"]
    weights_path = directory / layout["weights_file"]
    if model is None and "model_type" in config:  # transformers: its own loader, through our HfQuantizer
        import transformers

        from ..integrations import transformers as _registration  # noqa: F401  (registers "adaquant")

        arch = (config.get("architectures") or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            cls = transformers.AutoModel
        read_weights(weights_path)  # clear error on a corrupted file before transformers parses it
        return cls.from_pretrained(str(directory), device_map=None).to(device).eval()
    tensors = read_weights(weights_path)
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
    return skeleton.to(device).eval()
