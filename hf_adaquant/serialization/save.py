"""Save a quantized model as a checkpoint folder, atomically.

A save builds the whole folder next to the target and swaps it in atomically (the user's other files, e.g. a
tokenizer, are carried over); where the folder cannot be swapped (a mount point, a read-only parent) the files are
replaced one by one with config.json last, and the weights/config binding (:mod:`.weights`) turns an interrupted
save into a clear error on load.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn import QModuleMixin
from ..nn.qembedding import quantized_embeddings
from ..utils.files import TEMP_MARKER, fsync_path, remove_stale_temporaries, replace_directory, temporary_name
from .checkpoint_config import model_kind, quantization_config_dict
from .embeddings import pack_embedding
from .layout import WEIGHTS_NAME, pack_layer
from .weights import CONFIG_NAME, WEIGHTS_DIGEST_KEY as _WEIGHTS_DIGEST_KEY, CheckpointError, write_weights

__all__ = ["model_tensors", "save_quantized"]

_logger = logging.getLogger("hf_adaquant.serialization.checkpoint")  # one logger name for save and load

_GENERATION_CONFIG_NAME = "generation_config.json"
# What transformers / timm load as float weights from a folder (sharded checkpoints need their index file).
_FLOAT_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
_FLOAT_SHARD_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")
# Renames that fail when the folder cannot be swapped as a whole (a mount point, a read-only or locked parent).
_NO_SWAP_ERRNOS = frozenset({errno.EXDEV, errno.EBUSY, errno.EACCES, errno.EPERM, errno.EROFS})


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
