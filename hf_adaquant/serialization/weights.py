"""The weights file of a checkpoint (``adaquant_model.safetensors``): write it with its digests, read it back checked.

The file's metadata holds a SHA-256 of its tensors (a corrupted file is reported, not loaded) and one of the
``checkpoint_layout`` it was saved with, which config.json records in turn (``checkpoint_layout.weights_sha256``):
files of different saves, or a config.json edited by hand, are refused. Files written before that binding (neither
key) still load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..utils.hashing import json_digest, tensors_digest
from .embeddings import check_embedding_tensors
from .layout import LAYOUT_VERSION, check_layer_tensors

__all__ = ["CONFIG_NAME", "CheckpointError", "check_weights_header", "layout_digest", "read_weights",
           "verify_layer_tensors", "write_weights"]

CONFIG_NAME = "config.json"
_DIGEST_KEY = "hf_adaquant_sha256"  # weights metadata: SHA-256 of the tensors
_LAYOUT_DIGEST_KEY = "hf_adaquant_layout_sha256"  # weights metadata: SHA-256 of the checkpoint layout
_WEIGHTS_DIGEST_KEY = "weights_sha256"  # checkpoint_layout: the weights file's _DIGEST_KEY
WEIGHTS_DIGEST_KEY = _WEIGHTS_DIGEST_KEY  # public name for the config side (save and validate_layout use it)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, truncated, of an unknown layout version, or does not belong to the
    other file of its folder; or a save target holds files a save would destroy."""


def layout_digest(layout: dict[str, Any]) -> str:
    """SHA-256 of a ``checkpoint_layout`` (everything but the weights digest it holds), as stored in the weights."""
    return json_digest({k: v for k, v in layout.items() if k != _WEIGHTS_DIGEST_KEY})


def write_weights(tensors: dict[str, torch.Tensor], path: Path, layout: dict[str, Any] | None = None) -> str:
    """Write ``tensors`` with their digest (and ``layout``'s, binding the file to its config); returns the digest."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest = tensors_digest(tensors)
    version = LAYOUT_VERSION if layout is None else layout["version"]
    metadata = {"format": "pt", "hf_adaquant_layout": str(version), _DIGEST_KEY: digest}
    if layout is not None:
        metadata[_LAYOUT_DIGEST_KEY] = layout_digest(layout)
    save_file(tensors, str(path), metadata=metadata)
    return digest


def _open_error(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: corrupted or truncated safetensors file ({type(exc).__name__}: {exc})")


def _check_binding(path: Path, metadata: dict[str, str], layout: dict[str, Any]) -> None:
    """Refuse a config.json and a weights file that were not saved together (or were edited since)."""
    config_path = path.parent / CONFIG_NAME
    recorded_layout = metadata.get(_LAYOUT_DIGEST_KEY)
    recorded_weights = layout.get(_WEIGHTS_DIGEST_KEY)
    if recorded_layout is None and recorded_weights is None:
        return  # written before the binding existed: nothing to compare
    problem = None
    if recorded_layout is None or recorded_weights is None:
        problem = "only one of them records the other's digest"
    elif recorded_weights != metadata.get(_DIGEST_KEY):
        problem = "the weights digest in config.json differs from the file's"
    elif recorded_layout != layout_digest(layout):
        problem = "the checkpoint_layout in config.json (layers, bits, shapes) differs from the one saved"
    if problem:
        raise CheckpointError(f"{config_path} does not belong to {path} (saved by different runs, or edited?): "
                              f"{problem}")


def check_weights_header(path: str | os.PathLike, layout: dict[str, Any] | None = None) -> dict[str, str]:
    """Open a weights file's header only (cheap): it must be a whole safetensors file of this library, bound to
    ``layout`` when given. Returns its metadata.

    Raises:
        CheckpointError: missing, truncated, not ours, or not saved with ``layout`` (naming the file).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises SafetensorError / OSError / RuntimeError by failure
        raise _open_error(path, exc) from exc
    if _DIGEST_KEY not in metadata:
        raise CheckpointError(f"{path}: not an hf_adaquant weights file (no {_DIGEST_KEY} in its metadata)")
    if layout is not None:
        _check_binding(path, metadata, layout)
    return metadata


def read_weights(path: str | os.PathLike, device: str | torch.device = "cpu",
                 layout: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an ``adaquant_model.safetensors`` file, checked against the digest in its metadata (and,
    given the ``checkpoint_layout`` of its config.json, checked to belong to that config).

    Raises:
        CheckpointError: the file is missing, not a safetensors file, truncated, its content changed, or it was
            not saved with ``layout``.
    """
    from safetensors import safe_open

    path = Path(path)
    metadata = check_weights_header(path, layout)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:
        raise _open_error(path, exc) from exc
    if tensors_digest(tensors) != metadata[_DIGEST_KEY]:
        raise CheckpointError(f"{path}: corrupted (the tensors do not match the SHA-256 recorded when saved)")
    return tensors


def verify_layer_tensors(tensors: dict[str, torch.Tensor], layout: dict[str, Any], where: str) -> None:
    """Check every quantized layer's stored tensors against its description (dtypes, shapes, zero-points).

    Raises:
        CheckpointError: naming ``where`` (the file) and the layer.
    """
    for kind, entries, check in (("layer", layout["layers"], check_layer_tensors),
                                 ("embedding", layout.get("embeddings", {}), check_embedding_tensors)):
        for name, desc in entries.items():
            prefix = f"{name}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            try:
                check(own, desc)
            except ValueError as exc:
                raise CheckpointError(f"{where}: {kind} {name!r}: {exc}") from exc
