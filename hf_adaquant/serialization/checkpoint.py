"""Save a quantized model as a compact checkpoint and load it back (transformers, timm or plain PyTorch).

A checkpoint directory holds ``config.json`` (the model's own config: transformers' or timm's, or ours for plain
modules, with ``quantization_config`` added) and ``adaquant_model.safetensors`` (packed codes + float tensors of
the layers left in float). Only safetensors is read: no pickle. The weights file carries a SHA-256 of its tensors
in its metadata so a corrupted file is reported, not loaded.

The two files are bound to each other: ``checkpoint_layout.weights_sha256`` in config.json is the weights file's
tensor digest, and the weights metadata holds a digest of the checkpoint layout (layers, bits, shapes, folded
BatchNorms). Files of different saves, or a config.json edited by hand, are refused on load instead of giving a
model whose bits do not match its codes. Checkpoints written before the binding (neither key) still load.

A save builds the whole folder next to the target and swaps it in atomically (the user's other files, e.g. a
tokenizer, are carried over); where the folder cannot be swapped (a mount point, a read-only parent) the files are
replaced one by one with config.json last, and the binding turns an interrupted save into a clear error on load.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import AdaQuantConfig
from ..nn import QModuleMixin
from ..nn.qembedding import quantized_embeddings
from ..report import QuantizationReport
from ..utils.files import TEMP_MARKER, fsync_path, remove_stale_temporaries, replace_directory, temporary_name
from .embeddings import check_embedding_tensors, pack_embedding, unpack_embedding, validate_embedding_description
from .layout import (LAYOUT_VERSION, READABLE_LAYOUT_VERSIONS, WEIGHTS_NAME, apply_signed, check_layer_tensors,
                     describe_model, pack_layer, quantize_skeleton_, unpack_layer, validate_layer_description)
from .packed import freeze

__all__ = ["CONFIG_NAME", "CheckpointError", "check_weights_header", "layout_digest", "load_quantized", "model_kind",
           "quantization_config_dict", "read_checkpoint_config", "read_weights", "register_checkpoint_loader", "register_load_finalizer",
           "save_quantized", "validate_layout", "verify_layer_tensors"]

_logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
_GENERATION_CONFIG_NAME = "generation_config.json"
_DIGEST_KEY = "hf_adaquant_sha256"  # weights metadata: SHA-256 of the tensors
_LAYOUT_DIGEST_KEY = "hf_adaquant_layout_sha256"  # weights metadata: SHA-256 of the checkpoint layout
_WEIGHTS_DIGEST_KEY = "weights_sha256"  # checkpoint_layout: the weights file's _DIGEST_KEY
# What transformers / timm load as float weights from a folder (sharded checkpoints need their index file).
_FLOAT_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
_FLOAT_SHARD_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")
# Renames that fail when the folder cannot be swapped as a whole (a mount point, a read-only or locked parent).
_NO_SWAP_ERRNOS = frozenset({errno.EXDEV, errno.EBUSY, errno.EACCES, errno.EPERM, errno.EROFS})


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupted, truncated, of an unknown layout version, or does not belong to the
    other file of its folder; or a save target holds files a save would destroy."""


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


def layout_digest(layout: dict[str, Any]) -> str:
    """SHA-256 of a ``checkpoint_layout`` (everything but the weights digest it holds), as stored in the weights."""
    body = {k: v for k, v in layout.items() if k != _WEIGHTS_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_weights(tensors: dict[str, torch.Tensor], path: Path, layout: dict[str, Any] | None = None) -> str:
    """Write ``tensors`` with their digest (and ``layout``'s, binding the file to its config); returns the digest."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    digest = _digest(tensors)
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
    if _digest(tensors) != metadata[_DIGEST_KEY]:
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


# --------------------------------------------------------------------------------------------------------- save
def model_tensors(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor to store: float state of the layers left in float, packed form of the quantized ones (layers
    and embedding tables)."""
    qlayers = {name: m for name, m in qmodel.named_modules() if isinstance(m, QModuleMixin)}
    tables = quantized_embeddings(qmodel)
    prefixes = tuple(f"{name}." for name in [*qlayers, *tables])
    tensors: dict[str, torch.Tensor] = {}
    for key, value in qmodel.state_dict().items():
        if not key.startswith(prefixes):
            # clone: tied parameters share storage, which safetensors refuses
            tensors[key] = value.detach().cpu().clone()
    for name, module in qlayers.items():
        try:
            packed = pack_layer(module)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from exc
        for suffix, tensor in packed.items():
            tensors[f"{name}.{suffix}"] = tensor
    for name, table in tables.items():
        tensors.update({f"{name}.{suffix}": t for suffix, t in pack_embedding(table).items()})
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


def _write_checkpoint(directory: Path, qmodel: nn.Module, kind: str, qconfig: dict[str, Any],
                      tensors: dict[str, torch.Tensor], base_model_config: Any) -> None:
    """Write the weights, then config.json (recording the weights digest), into the empty folder ``directory``."""
    layout = qconfig["checkpoint_layout"]
    layout.pop(_WEIGHTS_DIGEST_KEY, None)
    layout[_WEIGHTS_DIGEST_KEY] = write_weights(tensors, directory / layout["weights_file"], layout)
    _write_config(qmodel, kind, qconfig, directory, base_model_config)


def _float_weight_files(directory: Path) -> list[str]:
    found = {name for name in _FLOAT_WEIGHT_NAMES if (directory / name).exists()}
    for pattern in _FLOAT_SHARD_PATTERNS:
        found.update(path.name for path in directory.glob(pattern))
    return sorted(found)


def _check_target(target: Path) -> None:
    """Refuse a target a save would damage: a file, or a folder holding another model's float weights."""
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a folder")
    found = _float_weight_files(target) if target.is_dir() else []
    if found:
        # Never deleted: they may be the only copy of a model. Left next to the codes, they would load (as the float
        # model, or mixed) where hf_adaquant is not imported.
        raise CheckpointError(f"{target}: holds another model's float weights ({', '.join(found)}); nothing was "
                              "written. Save the quantized checkpoint into an empty folder, or remove those files "
                              "yourself")


def _remove_stale(target: Path) -> None:
    """Remove what killed saves left: staging folders next to ``target`` and in-place temporaries inside it."""
    for directory, name in ((target.parent, target.name), (target, None)):
        try:
            remove_stale_temporaries(directory, name)
        except OSError as exc:  # cleaning is best effort: it must not stop the save
            _logger.warning("%s: could not remove stale temporaries (%s)", directory, exc)


def _can_swap(target: Path) -> bool:
    """Whether a sibling folder can replace ``target`` by a rename: not a mount point, a writable parent, and not
    this process's working folder (which would be left pointing at the removed old folder)."""
    if not target.is_dir():
        return True
    return not os.path.ismount(target) and os.access(target.parent, os.W_OK | os.X_OK) and \
        not os.path.samefile(target, os.getcwd())


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # the old folder goes away after the swap: a link costs no copy
    except OSError:
        shutil.copy2(source, destination)


def _carry_user_files(target: Path, staging: Path) -> None:
    """Copy into ``staging`` the files of ``target`` a save does not write (tokenizer, README, eval results...)."""
    own = {CONFIG_NAME, _GENERATION_CONFIG_NAME, WEIGHTS_NAME}
    for item in target.iterdir():
        if item.name in own or TEMP_MARKER in item.name:
            continue
        destination = staging / item.name
        if item.is_symlink():
            os.symlink(os.readlink(item), destination)
        elif item.is_dir():
            shutil.copytree(item, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(item), str(destination))


def _save_swapped(target: Path, write: Any) -> None:
    """Build the whole new folder next to ``target``, then swap it in: readers see the old folder or the new one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(target)  # remove_stale_temporaries(parent, target.name) finds it after a kill
    os.mkdir(staging)
    try:
        if target.is_dir():
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
            _carry_user_files(target, staging)
        write(staging)
        for item in staging.iterdir():
            fsync_path(item)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _save_in_place(target: Path, write: Any) -> None:
    """Where the folder cannot be swapped: write into a temporary folder inside ``target``, then move the files
    in one by one, config.json last. config.json is the commit point: a save killed before it leaves new weights
    with the old config, which the digest binding refuses on load (never a silent mix)."""
    staging = temporary_name(target / "checkpoint")
    os.mkdir(staging)
    try:
        write(staging)
        names = sorted(item.name for item in staging.iterdir() if item.name != CONFIG_NAME) + [CONFIG_NAME]
        for name in names:
            fsync_path(staging / name)
            os.replace(staging / name, target / name)
        fsync_path(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_quantized(qmodel: nn.Module, save_dir: str | os.PathLike, *, base_model_config: Any = None) -> Path:
    """Write ``qmodel`` (from :func:`hf_adaquant.quantize`) as a compact checkpoint directory.

    Args:
        qmodel: a quantized transformers, timm or plain PyTorch model.
        save_dir: target directory. An existing one is replaced as a whole (the new folder is built next to it,
            with the other files already there such as a tokenizer, then swapped in); it must not hold another
            model's float weights (``model.safetensors``, ``pytorch_model.bin``...), which are never deleted.
        base_model_config: transformers: a ``PretrainedConfig`` to write instead of ``qmodel.config`` or a dict of
            overrides; timm: timm's ``model_config`` (extra keys, ``model_args``); plain modules: extra JSON keys
            (e.g. the arguments of the skeleton factory).

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: ``save_dir`` is a file or holds float weights (nothing is written).
        OSError: the folder cannot be written (naming ``save_dir``); a previous checkpoint there is left whole.

    Example:
        >>> qmodel = quantize(model, batches, AdaQuantConfig(weight_bits=4))
        >>> save_quantized(qmodel, "out")          # then load_quantized("out") or AutoModelFor...("out")
    """
    save_dir = Path(save_dir)
    kind = model_kind(qmodel)
    qconfig = quantization_config_dict(qmodel)
    tensors = model_tensors(qmodel)
    # absolute (a name for the sibling staging folder even for "."); a link: replace its folder, keep the link
    target = save_dir.resolve() if save_dir.is_symlink() else Path(os.path.abspath(save_dir))
    _check_target(target)

    def write(directory: Path) -> None:
        _write_checkpoint(directory, qmodel, kind, qconfig, tensors, base_model_config)

    try:
        _remove_stale(target)
        if not _can_swap(target):
            _save_in_place(target, write)
        else:
            try:
                _save_swapped(target, write)
            except OSError as exc:
                if exc.errno not in _NO_SWAP_ERRNOS or not target.is_dir():
                    raise
                _logger.info("%s: cannot swap the folder (%s); replacing its files one by one", target, exc.strerror)
                _save_in_place(target, write)
    except OSError as exc:  # name the user's folder, not a hidden temporary
        raise OSError(exc.errno, f"cannot save the checkpoint: {exc.strerror or exc}", str(save_dir)) from exc
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
        try:
            layer_state, signed[name] = unpack_layer(own, desc, f"{where}: layer {name!r}")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        state.update({prefix + k: v for k, v in layer_state.items()})
        unknown = sorted(set(own) - {"weight_packed", "weight_scale", "weight_zero_point", "weight_signed", "bias",
                                     "input_scale", "input_zero_point", "input_signed"})
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
