"""Resumable AdaQuant runs: per-layer results checkpointed atomically in a work directory.

Layout::

    work_dir/
      fingerprint.json                 what produced these results (config, model, calibration data)
      layers/<layer name>.safetensors  one finished layer: its state dict; metadata = name, report, attributes

A layer file appears only once complete (written to a temporary name, then ``os.replace``d), so a run killed at
any moment leaves either the whole result or nothing. A re-run with the same fingerprint loads the finished layers
instead of optimising them again; a different fingerprint is refused (:class:`WorkDirMismatchError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import AdaQuantConfig
from ..quant import Quantizer
from ..utils.batches import Batch

__all__ = ["FORMAT_VERSION", "WorkDir", "WorkDirMismatchError", "layer_state", "load_layer_state", "run_fingerprint"]

FORMAT_VERSION = 1
_KILL_AFTER_ENV = "HF_ADAQUANT_TEST_KILL_AFTER_LAYERS"  # test hook: SIGKILL this process after N saved layers
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Fields that do not change the result: a resumed run may differ in them.
_IGNORED_CONFIG_FIELDS = ("progress",)


class WorkDirMismatchError(ValueError):
    """The work directory holds results of a different run (config, model or calibration data differ)."""


def _hash_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for key, t in items:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _batch_items(i: int, batch: Batch) -> list[tuple[str, torch.Tensor]]:
    if isinstance(batch, torch.Tensor):
        return [(f"{i}", batch)]
    if isinstance(batch, dict):
        return [(f"{i}.{k}", batch[k]) for k in sorted(batch) if isinstance(batch[k], torch.Tensor)]
    return [(f"{i}.{j}", v) for j, v in enumerate(batch) if isinstance(v, torch.Tensor)]


def run_fingerprint(config: AdaQuantConfig, qmodel: nn.Module, fp_model: nn.Module, layer_names: Sequence[str],
                    batches: Sequence[Batch], num_processes: int | None = None) -> dict[str, Any]:
    """Everything a layer's result depends on, in a JSON-able dict.

    ``num_processes`` is recorded for the sequential variant only: it runs data-parallel, so its result depends
    on how the calibration samples are split. The parallel variant's result does not.
    """
    cfg = {k: v for k, v in config.to_dict().items() if k not in _IGNORED_CONFIG_FIELDS}
    layers = []
    for name in layer_names:
        layer = qmodel.get_submodule(name)
        abits = None if getattr(layer, "input_quantizer", None) is None else layer.input_quantizer.bits
        layers.append([name, type(layer).__name__, layer.weight_quantizer.bits, abits, list(layer.weight.shape)])
    return {
        "format": FORMAT_VERSION,
        "config": json.loads(json.dumps(cfg)),  # tuples -> lists, as read back from the file
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
            diffs += [f"config.{k}: {a.get(k)!r} (work dir) != {b.get(k)!r} (this run)"
                      for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class WorkDir:
    """A work directory of per-layer AdaQuant results (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.layers_dir = self.path / "layers"
        self._saved = 0

    # --------------------------------------------------------------------------------- fingerprint

    def prepare(self, fingerprint: dict[str, Any]) -> None:
        """Create the directory for ``fingerprint``, or check that an existing one was made by the same run.

        Raises:
            WorkDirMismatchError: the directory belongs to a different run; the message lists what differs.
        """
        file = self.path / "fingerprint.json"
        if file.exists():
            old = json.loads(file.read_text())
            diffs = _differences(old, fingerprint)
            if diffs:
                raise WorkDirMismatchError(
                    f"work dir {str(self.path)!r} holds results of a different run; refusing to mix them. "
                    f"Differences: {'; '.join(diffs)}. Use another work dir, or delete this one to start over.")
        elif self.path.exists() and any(p.name != "layers" for p in self.path.iterdir()) \
                or self.layers_dir.exists() and any(self.layers_dir.glob("*.safetensors")):
            raise WorkDirMismatchError(f"work dir {str(self.path)!r} exists, is not empty and has no "
                                       "fingerprint.json: not an hf_adaquant work dir, refusing to write into it")
        self.layers_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.layers_dir.glob(".*.tmp*"):  # left by a run killed mid-write
            stale.unlink(missing_ok=True)
        if not file.exists():
            _atomic_write_bytes(file, json.dumps(fingerprint, indent=1, sort_keys=True).encode())

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
        """Checkpoint one finished layer: its state dict, quantizer attributes and report (atomic)."""
        tensors, attributes = layer_state(layer)
        metadata = {"name": name, "report": json.dumps(report), "attributes": json.dumps(attributes),
                    "format": str(FORMAT_VERSION)}
        path = self._file(name)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._saved += 1
        kill_after = os.environ.get(_KILL_AFTER_ENV)
        if kill_after and self._saved >= int(kill_after):
            os.kill(os.getpid(), signal.SIGKILL)

    def load_layer(self, name: str, layer: nn.Module) -> dict[str, Any]:
        """Restore a finished layer in place; returns its report."""
        path = self._file(name)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("name") != name:
            raise RuntimeError(f"{path} holds layer {metadata.get('name')!r}, expected {name!r}")
        load_layer_state(layer, tensors, json.loads(metadata["attributes"]))
        return json.loads(metadata["report"])
