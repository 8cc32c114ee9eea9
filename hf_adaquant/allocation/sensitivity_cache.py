"""The sensitivity cache: a JSON file keyed by a fingerprint of everything the measured matrix depends on.

The fingerprint holds exactly the config fields the measurement reads, as declared in
:mod:`hf_adaquant.config.stages` (:data:`~hf_adaquant.config.stages.SENSITIVITY`, plus
:data:`~hf_adaquant.config.stages.SENSITIVITY_ADVANCED` in the advanced pipeline), the layer names and hashes of
the model weights and calibration data (:mod:`hf_adaquant.utils.hashing`, sampled layout: caches written before
stay valid).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import AdaQuantConfig
from ..config.stages import SENSITIVITY, SENSITIVITY_ADVANCED
from ..utils.files import atomic_write_text
from ..utils.hashing import update_sampled
from .criteria import LossFn
from .ilp import AllocationProblem

__all__ = ["SENSITIVITY_ADVANCED_FIELDS", "SENSITIVITY_CACHE_VERSION", "SENSITIVITY_FIELDS", "hash_data",
           "hash_model", "load_cache", "save_cache", "sensitivity_fingerprint"]

logger = logging.getLogger("hf_adaquant.allocation.sensitivity")  # the measurement's logger: one name to configure

SENSITIVITY_CACHE_VERSION = 2  # 2: the key holds the rounding fields (weight_rounding, lr_rounding, ...)

# The config fields this stage reads (directly or through prepare_model, build_problem/policy_pins and _fit_layer)
# are declared with the other stages' in hf_adaquant.config.stages; the cache key is built from exactly those: a
# change to one of them recomputes, a change to any other field (bias tuning, budgets, progress...) reuses the cache.
# ``activation_bits`` is read only as "weight-only or not" (``candidate_activation_bits`` give the bits), so the key
# holds that flag instead.
SENSITIVITY_FIELDS: tuple[str, ...] = SENSITIVITY.reads
"""Config fields the sensitivity measurement reads in either pipeline."""
SENSITIVITY_ADVANCED_FIELDS: tuple[str, ...] = SENSITIVITY_ADVANCED.reads
"""Config fields it reads in the advanced pipeline only (AdaQuant's, through ``optimize_layer``)."""


def hash_model(model: nn.Module) -> str:
    """Hash of a model's state (names, shapes, dtypes, all values): the cache's ``model_hash``."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            update_sampled(h, t, None)
    return h.hexdigest()[:16]


def hash_data(items: Sequence[Any], max_elements: int = 1 << 16) -> str:
    """Hash of batches (or labels): shapes, dtypes, keys and a strided sample of every tensor's values."""
    h = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            update_sampled(h, obj, max_elements)
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                visit(obj[k])
        elif isinstance(obj, (tuple, list)):
            h.update(f"[{len(obj)}".encode())
            for v in obj:
                visit(v)
        else:
            h.update(repr(obj).encode())

    visit(list(items))
    return h.hexdigest()[:16]


def sensitivity_fingerprint(
    config: AdaQuantConfig, layer_names: Sequence[str], *, model_hash: str = "", data_hash: str = "",
    labels_hash: str = "", loss_fn: LossFn | None = None, max_eval_samples: int | None = None,
) -> dict[str, Any]:
    """What a cached sensitivity matrix depends on: the config fields the measurement reads
    (:data:`SENSITIVITY_FIELDS`, plus :data:`SENSITIVITY_ADVANCED_FIELDS` for the advanced pipeline), the layer
    names, and hashes of the model weights and calibration data."""
    fp: dict[str, Any] = {"cache_version": SENSITIVITY_CACHE_VERSION}
    fp.update(SENSITIVITY.values(config))
    if config.pipeline == "advanced":
        fp.update(SENSITIVITY_ADVANCED.values(config))
    fp["weight_only"] = config.activation_bits is None
    fp["layer_names"] = list(layer_names)
    fp["model_hash"] = model_hash
    fp["data_hash"] = data_hash
    fp["max_eval_samples"] = max_eval_samples
    if config.sensitivity_criterion == "task":
        fp["labels_hash"] = labels_hash
        fp["loss_fn"] = "default_cross_entropy" if loss_fn is None else \
            f"{getattr(loss_fn, '__module__', '?')}.{getattr(loss_fn, '__qualname__', repr(loss_fn))}"
    return fp


def load_cache(path: Path, fingerprint: dict[str, Any]) -> AllocationProblem | None:
    """The problem cached at ``path`` if its fingerprint equals ``fingerprint``; None (with a warning why) if not."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        cached = data["fingerprint"]
        if cached != fingerprint:
            keys = sorted(k for k in set(cached) | set(fingerprint) if cached.get(k) != fingerprint.get(k))
            logger.warning("sensitivity cache %s is stale (differs in: %s); recomputing", path, ", ".join(keys))
            return None
        problem = AllocationProblem.from_dict(data["problem"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("sensitivity cache %s is unreadable (%s: %s); recomputing", path, type(exc).__name__, exc)
        return None
    logger.info("loaded sensitivities from %s", path)
    return problem


def save_cache(path: Path, fingerprint: dict[str, Any], problem: AllocationProblem, seconds: float) -> None:
    """Write the problem with its fingerprint (atomically: a killed run never leaves a half-written cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": fingerprint, "seconds": seconds, "problem": problem.to_dict()}
    atomic_write_text(path, json.dumps(payload, indent=1))
    logger.info("saved sensitivities to %s", path)
