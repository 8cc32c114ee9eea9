"""Resumable AdaQuant runs: per-layer results checkpointed atomically in a work directory.

Layout::

    work_dir/
      fingerprint.json                 what produced these results (config, model, calibration data)
      layers/<layer name>.safetensors  one finished layer: its state dict; metadata = name, report, attributes,
                                       and the SHA-256 of all of it

A layer file appears only once complete (written to a temporary name, then renamed, by
:func:`hf_adaquant.utils.files.atomic_path`), so a run killed at any moment leaves either the whole result or
nothing. A re-run with the same fingerprint loads the finished layers instead of optimising them again, after
checking each against its digest: a damaged or edited file is refused (:class:`WorkDirCorruptError`, naming the
file and the layer), never loaded into the model. A different fingerprint is refused (:class:`WorkDirMismatchError`)
unless no layer is finished yet (then nothing is lost by starting over: the work dir takes the new fingerprint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import AdaQuantConfig
from ..config.stages import ADAQUANT_LAYERS
from ..quant import Quantizer
from ..utils.batches import Batch
from ..utils.files import TEMP_MARKER, atomic_path, atomic_write_text, remove_stale_temporaries
from ..utils.hashing import tensors_digest, update_framed

__all__ = ["FORMAT_VERSION", "WorkDir", "WorkDirCorruptError", "WorkDirMismatchError", "layer_state",
           "load_layer_state", "run_fingerprint"]

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: layer files carry a SHA-256 digest of their tensors and metadata
_DIGEST_KEY = "sha256"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class WorkDirMismatchError(ValueError):
    """The work directory holds results of a different run (config, model or calibration data differ)."""


class WorkDirCorruptError(ValueError):
    """A work-dir file is damaged, edited or unreadable; the message names the file, the layer and the remedy."""


def _hash_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    # BLAKE2b-128 in the order given: the layout fingerprints of existing work dirs were written with
    return tensors_digest(items, algorithm="blake2b", digest_size=16, sort=False)


def _batch_items(i: int, batch: Batch) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [(f"{i}", batch)]
    if isinstance(batch, dict):
        return [(f"{i}.{k}", batch[k]) for k in sorted(batch) if isinstance(batch[k], torch.Tensor)]
    return [(f"{i}.{j}", v) for j, v in enumerate(batch) if isinstance(v, torch.Tensor)]


def run_fingerprint(config: AdaQuantConfig, qmodel: nn.Module, fp_model: nn.Module, layer_names: Sequence[str],
                    batches: Sequence[Batch], num_processes: int | None = None) -> dict[str, Any]:
    """Everything a layer's result depends on, in a JSON-able dict.

    The config part holds exactly the fields the per-layer phase reads (:data:`~hf_adaquant.config.stages.
    ADAQUANT_LAYERS`: the scheme, the optimiser, the seed, the cache precision): a resume is accepted after a
    change to tuning, allocation, quantize-on-load or progress fields only, and refused after a change to a field
    the phase reads.
    ``num_processes`` is recorded for the sequential variant only: it runs data-parallel, so its result depends
    on how the calibration samples are split. The parallel variant's result does not.
    """
    layers = []
    for name in layer_names:
        layer = qmodel.get_submodule(name)
        abits = None if getattr(layer, "input_quantizer", None) is None else layer.input_quantizer.bits
        layers.append([name, type(layer).__name__, layer.weight_quantizer.bits, abits, list(layer.weight.shape)])
    return {
        "format": FORMAT_VERSION,
        "config": ADAQUANT_LAYERS.values(config),  # tuples -> lists, as read back from the file
        "layers": layers,
        "model_weights": _hash_tensors(fp_model.state_dict().items()),
        "calibration_data": _hash_tensors(item for i, b in enumerate(batches) for item in _batch_items(i, b)),
        "num_processes": num_processes,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            # Only the fields this run's fingerprint holds: a work dir written when the fingerprint held every
            # config field stays resumable when only fields the per-layer phase does not read differ.
            diffs += [f"config.{k}: {a.get(k)!r} (work dir) != {b.get(k)!r} (this run)"
                      for k in sorted(b) if a.get(k) != b.get(k)]
        elif key == "layers":
            diffs.append("model structure (quantized layers, their types, bits or weight shapes)")
        elif key in ("model_weights", "calibration_data"):
            diffs.append(f"{key.replace('_', ' ')} (content hash {a} != {b})")
        else:
            diffs.append(f"{key}: {a!r} (work dir) != {b!r} (this run)")
    return diffs


def layer_state(layer: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """A finished layer as CPU tensors plus the quantizer attributes its state dict lacks (``signed``)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in layer.state_dict().items()}
    attributes = {k: {"signed": m.signed} for k, m in layer.named_modules() if isinstance(m, Quantizer)}
    return tensors, attributes


def load_layer_state(layer: nn.Module, tensors: dict[str, torch.Tensor],
                     attributes: dict[str, dict[str, Any]]) -> None:
    """Inverse of :func:`layer_state`, in place."""
    layer.load_state_dict(tensors)
    modules = dict(layer.named_modules())
    for sub, attrs in attributes.items():
        for key, value in attrs.items():
            setattr(modules[sub], key, value)


def _layer_digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 of a layer file's content: every tensor (name, dtype, shape, bytes) and the metadata but itself."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        update_framed(h, key, tensors[key])
    h.update(json.dumps({k: v for k, v in metadata.items() if k != _DIGEST_KEY}, sort_keys=True).encode())
    return h.hexdigest()


class WorkDir:
    """A work directory of per-layer AdaQuant results (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.layers_dir = self.path / "layers"

    # --------------------------------------------------------------------------------- fingerprint

    def prepare(self, fingerprint: dict[str, Any]) -> None:
        """Create the directory for ``fingerprint``, or check that an existing one was made by the same run.

        A work dir with no finished layer yet takes the new fingerprint (a run that failed before finishing a
        layer, e.g. on bad calibration data, is simply started again).

        Raises:
            WorkDirMismatchError: the directory holds finished layers of a different run (the message lists what
                differs), or is not an hf_adaquant work dir.
            WorkDirCorruptError: ``fingerprint.json`` is unreadable while finished layers depend on it.
        """
        file = self.path / "fingerprint.json"
        write = not file.exists()
        if file.exists():
            old = self._read_fingerprint(file)
            diffs = ["fingerprint.json is unreadable"] if old is None else _differences(old, fingerprint)
            if diffs and self._has_finished_layers():
                if old is None:
                    raise WorkDirCorruptError(
                        f"{file} is not valid JSON, so the finished layers in {str(self.layers_dir)!r} cannot be "
                        f"checked against this run. Delete the work dir {str(self.path)!r} to start over.")
                raise WorkDirMismatchError(
                    f"work dir {str(self.path)!r} holds results of a different run; refusing to mix them. "
                    f"Differences: {'; '.join(diffs)}. Use another work dir, or delete this one to start over.")
            if diffs:
                _logger.info("work dir %s has no finished layer: starting over with this run's fingerprint (%s)",
                             self.path, "; ".join(diffs))
                write = True
        elif self.path.exists() and any(p.name != "layers" and TEMP_MARKER not in p.name
                                        for p in self.path.iterdir()) or self._has_finished_layers():
            raise WorkDirMismatchError(f"work dir {str(self.path)!r} exists, is not empty and has no "
                                       "fingerprint.json: not an hf_adaquant work dir, refusing to write into it")
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.layers_dir):  # temporaries left by a run killed mid-write
            remove_stale_temporaries(folder)
        if write:
            atomic_write_text(file, json.dumps(fingerprint, indent=1, sort_keys=True))

    @staticmethod
    def _read_fingerprint(file: Path) -> dict[str, Any] | None:
        """The recorded fingerprint, or None when the file is not a JSON object (damaged or edited)."""
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def _has_finished_layers(self) -> bool:
        return self.layers_dir.is_dir() and any(self.layers_dir.glob("*.safetensors"))

    # ------------------------------------------------------------------------------------- layers

    def _file(self, name: str) -> Path:
        if _SAFE_NAME.match(name) and not name.startswith("."):
            return self.layers_dir / f"{name}.safetensors"
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        return self.layers_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name).lstrip('.')}-{digest}.safetensors"

    def finished(self, layer_names: Sequence[str]) -> list[str]:
        """The layers of ``layer_names`` that have a complete result here, in the given order."""
        return [name for name in layer_names if self._file(name).exists()]

    def save_layer(self, name: str, layer: nn.Module, report: dict[str, Any]) -> None:
        """Checkpoint one finished layer: its state dict, quantizer attributes, report and their digest (atomic)."""
        tensors, attributes = layer_state(layer)
        metadata = {"name": name, "report": json.dumps(report), "attributes": json.dumps(attributes),
                    "format": str(FORMAT_VERSION)}
        metadata[_DIGEST_KEY] = _layer_digest(tensors, metadata)
        with atomic_path(self._file(name)) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def load_layer(self, name: str, layer: nn.Module) -> dict[str, Any]:
        """Restore a finished layer in place after checking its digest; returns its report.

        Raises:
            WorkDirCorruptError: the file is truncated, unreadable, edited or holds another layer; the message
                names the file and the layer and says to delete the file (that layer is then recomputed).
        """
        path = self._file(name)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error type for a truncated file or a bad header
            raise self._corrupt(path, name, f"it cannot be read ({type(exc).__name__}: {exc})") from exc
        if metadata.get("name") != name:
            raise self._corrupt(path, name, f"it holds layer {metadata.get('name')!r}")
        if metadata.get(_DIGEST_KEY) != _layer_digest(tensors, metadata):
            why = ("it has no digest" if _DIGEST_KEY not in metadata
                   else "its content does not match its SHA-256 digest (the file was damaged or edited)")
            raise self._corrupt(path, name, why)
        try:
            report = json.loads(metadata["report"])
            load_layer_state(layer, tensors, json.loads(metadata["attributes"]))
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise self._corrupt(path, name, f"it does not fit the layer ({type(exc).__name__}: {exc})") from exc
        return report

    @staticmethod
    def _corrupt(path: Path, name: str, why: str) -> WorkDirCorruptError:
        return WorkDirCorruptError(f"work dir file {str(path)!r} of layer {name!r} is unusable: {why}. Delete this "
                                   "file to recompute that layer (the other finished layers are kept).")
