"""Sensitivities for bit allocation: ``sens[l, k]`` = criterion increase with only layer ``l`` at option ``k``.

For every layer (not pinned) and every candidate option, a fresh quantized copy of the float layer is fitted on
that layer's FP inputs (the parallel variant: every ``(l, k)`` is independent) and swapped, alone, into the FP
model; the criterion is measured on the calibration data against the FP model:

* ``"kl"`` (default): KL(FP outputs || outputs) over the last dimension, as bias tuning uses;
* ``"mse"``: mean squared error of the outputs against the FP outputs;
* ``"task"``: ``loss_fn(outputs, labels)`` minus the FP model's loss (needs labels).

Advanced pipeline: the layer is optimised by AdaQuant (``optimize_layer``) with the config's hyper-parameters.
Light pipeline: range initialisation only (weights per channel, input range from the cached inputs).

The layer's inputs/outputs are captured once per layer and reused for all its options. Results can be cached in a
JSON file, keyed by a fingerprint of everything that changes them (see :func:`sensitivity_fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adaquant.cache import IOCache, capture_layer_io
from ..adaquant.layerwise import init_input_range, optimize_layer
from ..adaquant.staged import StagedRunner
from ..calibrate import init_weight_range
from ..config import AdaQuantConfig
from ..nn import quantize_module
from ..prepare import FoldResult, prepare_model
from ..tuning.bias import _kl, output_tensors
from ..utils.batches import Batch, batch_size, call_model, materialize_batches, slice_batch
from ..utils.logging import progress_bar
from ..utils.seeding import make_generator
from .budget import bits_of_option, build_problem, candidate_options, check_budget, policy_pins
from .ilp import AllocationProblem, BitOption

__all__ = ["SENSITIVITY_ADVANCED_FIELDS", "SENSITIVITY_CACHE_VERSION", "SENSITIVITY_FIELDS", "measure_sensitivity",
           "sensitivity_fingerprint"]

logger = logging.getLogger(__name__)

SENSITIVITY_CACHE_VERSION = 2  # 2: the key holds the rounding fields (weight_rounding, lr_rounding, ...)

# The config fields this stage reads, directly or through prepare_model, build_problem/policy_pins and _fit_layer
# (range initialisation, and optimize_layer in the advanced pipeline). The cache key is built from exactly these:
# a change to one of them recomputes, a change to any other field (bias tuning, budgets, progress...) reuses the
# cache. ``activation_bits`` is read only as "weight-only or not" (``candidate_activation_bits`` give the bits),
# so the key holds that flag instead; ``max_cache_bytes`` only bounds memory (same values). Keep in step with the
# code when it reads a new field (tests check the key).
SENSITIVITY_FIELDS: tuple[str, ...] = (
    "pipeline", "first_last_bits", "include", "exclude", "pinned_layers", "candidate_weight_bits",
    "candidate_activation_bits", "sensitivity_criterion", "weight_symmetric", "activation_symmetric",
    "weight_range_method", "activation_range_method", "max_calibration_samples", "seed", "cache_dtype",
    "embedding_bits")
"""Config fields the sensitivity measurement reads in either pipeline."""
SENSITIVITY_ADVANCED_FIELDS: tuple[str, ...] = (
    "iterations", "batch_size", "max_step_elements", "lr_weight", "lr_bias", "lr_weight_scale", "lr_act_scale",
    "lr_zero_point", "weight_deviation_limit", "weight_rounding", "rounding_regularization", "lr_rounding")
"""Config fields it reads in the advanced pipeline only (AdaQuant's, through ``optimize_layer``)."""

_TASK_NEEDS_LABELS = (
    "sensitivity_criterion='task' needs labels (and optionally a loss_fn; default cross-entropy on the first "
    "output): pass labels=... to measure_sensitivity, or use the label-free 'kl' or 'mse' criterion. quantize() "
    "takes no labels: measure with measure_sensitivity(..., labels=..., loss_fn=...), solve with allocate_bits and "
    "pass allocation_to_layer_bits(allocation) as config.layer_bits")

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# Criteria
# ----------------------------------------------------------------------------------------------------------------


def _default_task_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the first floating output tensor (the logits) against integer labels."""
    tensors = output_tensors(outputs)
    if not tensors:
        raise ValueError("the model output holds no floating tensor to compute a task loss on")
    return F.cross_entropy(tensors[0], labels.to(tensors[0].device))


def _split_labels(labels: Any, batches: Sequence[Batch]) -> list[Any]:
    """Labels per batch: a sequence with one entry per batch (extra entries ignored) or one tensor split by size."""
    if isinstance(labels, torch.Tensor):
        sizes = [batch_size(b) for b in batches]
        if labels.shape[0] < sum(sizes):
            raise ValueError(f"labels has {labels.shape[0]} entries but the calibration data has {sum(sizes)} samples")
        return list(torch.split(labels[: sum(sizes)], sizes))
    labels = list(labels)
    if len(labels) < len(batches):
        raise ValueError(f"labels has {len(labels)} batches but the calibration data has {len(batches)}")
    return labels[: len(batches)]


class _Criterion:
    """Criterion of a model on the calibration batches, relative to the FP model (FP value subtracted)."""

    def __init__(self, kind: str, fp_model: nn.Module, batches: Sequence[Batch], labels: Any,
                 loss_fn: LossFn | None, max_samples: int | None = None) -> None:
        self.kind = kind
        per_batch_labels = _split_labels(labels, batches) if labels is not None else None
        self.batches, self.weights = [], []
        for i, batch in enumerate(batches):  # the first max_samples samples
            n = batch_size(batch)
            if max_samples is not None:
                n = min(n, max_samples - sum(self.weights))
                if n <= 0:
                    break
                if n < batch_size(batch):
                    batch = slice_batch(batch, 0, n)
                    if per_batch_labels is not None:
                        per_batch_labels[i] = per_batch_labels[i][:n]
            self.batches.append(batch)
            self.weights.append(n)
        batches = self.batches
        self.labels = None
        self.loss_fn = loss_fn or _default_task_loss
        if kind == "task":
            if labels is None:
                raise ValueError(_TASK_NEEDS_LABELS)
            self.labels = per_batch_labels[: len(batches)]
            self.targets: list[list[torch.Tensor]] = []
        else:
            with torch.no_grad():
                self.targets = [[t.detach() for t in output_tensors(call_model(fp_model, b, i))]
                                for i, b in enumerate(batches)]
            if not all(self.targets):
                raise ValueError("the model output holds no floating tensor to compare with the FP model")
        self.baseline = 0.0  # the FP model matches its own outputs exactly
        if kind == "task":
            self.baseline = self(fp_model)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> float:
        total = 0.0
        for i, (batch, weight) in enumerate(zip(self.batches, self.weights)):
            out = call_model(model, batch, i)
            if self.kind == "task":
                value = self.loss_fn(out, self.labels[i])
            elif self.kind == "kl":
                value = _kl(output_tensors(out), self.targets[i])
            else:
                value = sum(F.mse_loss(q.float(), p.float()) for q, p in zip(output_tensors(out), self.targets[i]))
            total += float(value) * weight
        return total / sum(self.weights) - self.baseline


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint and cache
# ----------------------------------------------------------------------------------------------------------------


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor, max_elements: int | None) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    flat = t.reshape(-1)
    if max_elements is not None and flat.numel() > max_elements:
        flat = flat[:: -(-flat.numel() // max_elements)].contiguous()
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())


def _hash_model(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            _hash_tensor(h, t, None)
    return h.hexdigest()[:16]


def _hash_data(items: Sequence[Any], max_elements: int = 1 << 16) -> str:
    """Hash of batches (or labels): shapes, dtypes, keys and a strided sample of every tensor's values."""
    h = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            _hash_tensor(h, obj, max_elements)
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


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def sensitivity_fingerprint(
    config: AdaQuantConfig, layer_names: Sequence[str], *, model_hash: str = "", data_hash: str = "",
    labels_hash: str = "", loss_fn: LossFn | None = None, max_eval_samples: int | None = None,
) -> dict[str, Any]:
    """What a cached sensitivity matrix depends on: the config fields the measurement reads
    (:data:`SENSITIVITY_FIELDS`, plus :data:`SENSITIVITY_ADVANCED_FIELDS` for the advanced pipeline), the layer
    names, and hashes of the model weights and calibration data."""
    fields = SENSITIVITY_FIELDS + (SENSITIVITY_ADVANCED_FIELDS if config.pipeline == "advanced" else ())
    fp: dict[str, Any] = {"cache_version": SENSITIVITY_CACHE_VERSION}
    fp.update({name: _jsonable(getattr(config, name, None)) for name in fields})
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


def _load_cache(path: Path, fingerprint: dict[str, Any]) -> AllocationProblem | None:
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


def _save_cache(path: Path, fingerprint: dict[str, Any], problem: AllocationProblem, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"fingerprint": fingerprint, "seconds": seconds, "problem": problem.to_dict()}
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    logger.info("saved sensitivities to %s", path)


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------


def _fit_layer(float_layer: nn.Module, name: str, index: int, option: BitOption, fold: FoldResult,
               cache: IOCache, config: AdaQuantConfig) -> nn.Module:
    """A quantized copy of ``float_layer`` at ``option``, fitted on ``cache`` (AdaQuant or ranges only)."""
    wbits, abits = bits_of_option(option)
    qlayer = quantize_module(float_layer, wbits, abits, weight_symmetric=config.weight_symmetric,
                             activation_symmetric=config.activation_symmetric)
    qlayer.output_activation = fold.output_activations.get(name)
    qlayer.bn_target = fold.bn_targets.get(name)
    if config.pipeline == "advanced":
        optimize_layer(qlayer, cache, config, make_generator(config.seed, index), name=name)
    else:
        init_weight_range(qlayer, config.weight_range_method)
        init_input_range(qlayer, cache, config.activation_range_method, seed=config.seed + index)
    qlayer.eval()
    for p in qlayer.parameters():
        p.requires_grad_(False)
    return qlayer


def measure_sensitivity(
    model: nn.Module,
    calibration_batches: Sequence[Batch],
    config: AdaQuantConfig,
    *,
    labels: Any = None,
    loss_fn: LossFn | None = None,
    cache_path: str | os.PathLike | None = None,
    max_eval_samples: int | None = None,
    progress: bool = True,
) -> AllocationProblem:
    """Measure the ``(L, K)`` sensitivity matrix of ``model`` and return the allocation problem.

    Args:
        model: the float model (not modified).
        calibration_batches: calibration inputs (an iterable of batches, as for :func:`hf_adaquant.quantize`);
            at most ``config.max_calibration_samples`` samples are used.
        config: pipeline ("advanced": AdaQuant per option; "light": ranges only), candidates, criterion, the
            first/last policy and ``pinned_layers`` (pinned layers are not measured), include/exclude. If the config
            has a budget it is checked for feasibility first (:class:`InfeasibleBudgetError`, before measuring).
            ``config.layer_bits`` is ignored (it is what allocation produces); pin layers with ``pinned_layers``.
        labels: for ``sensitivity_criterion="task"``: one entry per batch, or one tensor over all samples.
        loss_fn: for "task": ``loss_fn(model_output, labels) -> scalar`` (mean over the batch); default
            cross-entropy on the first output tensor.
        cache_path: JSON file; reused when its fingerprint (config fields that matter, layer names, model and data
            hashes) matches, recomputed and overwritten otherwise.
        max_eval_samples: evaluate the criterion on the first this many calibration samples only (None: all).
            Every ``(layer, option)`` costs a forward pass of the whole model over them, which dominates the time
            of the light pipeline on large models; the layers are still fitted on all samples.
        progress: show a tqdm bar over the ``(layer, option)`` measurements.

    Returns:
        :class:`AllocationProblem` with options ``candidate_options(config)`` (+ pin-only options), the pins, and
        ``num_params``/``macs`` of the quantized layers. Sensitivities are criterion increases over the FP model.
    """
    if max_eval_samples is not None and max_eval_samples < 1:
        raise ValueError(f"max_eval_samples must be >= 1 or None, got {max_eval_samples!r}")
    batches = materialize_batches(calibration_batches, config.max_calibration_samples)
    if config.sensitivity_criterion == "task" and labels is None:
        raise ValueError(_TASK_NEEDS_LABELS)
    prepared = prepare_model(model, batches[0], config.replace(layer_bits={}))
    fp_model = prepared.fp_model
    info = {layer.name: layer for layer in prepared.layers}
    names = list(prepared.plan)
    skeleton = build_problem([info[n] for n in names], config)
    if config.has_budget:
        check_budget(skeleton, config)

    path = Path(cache_path) if cache_path is not None else None
    fingerprint: dict[str, Any] = {}
    if path is not None:
        fingerprint = sensitivity_fingerprint(
            config, names, model_hash=_hash_model(model), data_hash=_hash_data(batches),
            labels_hash=_hash_data(_split_labels(labels, batches)) if labels is not None else "", loss_fn=loss_fn,
            max_eval_samples=max_eval_samples)
        cached = _load_cache(path, fingerprint)
        if cached is not None:
            return cached

    start = time.perf_counter()
    criterion = _Criterion(config.sensitivity_criterion, fp_model, batches, labels, loss_fn, max_eval_samples)
    options = candidate_options(config)
    pins = policy_pins(names, config)
    sens = np.full(skeleton.sensitivity.shape, np.nan)
    todo = [(l, name) for l, name in enumerate(names) if name not in pins]
    dtype = torch.float16 if config.cache_dtype == "float16" else torch.float32
    bar = progress_bar(total=len(todo) * len(options), desc=f"sensitivity ({config.pipeline})", disable=not progress)
    # Stage by stage where the model has stages: one run of a layer's block captures it, not the whole FP prefix.
    staged, _ = StagedRunner.for_model(fp_model, None, names, batches, max_bytes=config.max_cache_bytes, dtype=dtype)
    try:
        for index, name in todo:
            parent_name, _, child = name.rpartition(".")
            parent = fp_model.get_submodule(parent_name) if parent_name else fp_model
            float_layer = getattr(parent, child)
            cache = staged.capture(name) if staged is not None else capture_layer_io(
                fp_model, fp_model, name, batches, dtype=dtype, max_bytes=config.max_cache_bytes)
            try:
                for k, option in enumerate(options):
                    bar.set_postfix_str(f"{name} {option.label}")
                    qlayer = _fit_layer(float_layer, name, index, option, prepared.fold, cache, config)
                    setattr(parent, child, qlayer)
                    try:
                        sens[index, k] = criterion(fp_model)
                    finally:
                        setattr(parent, child, float_layer)
                    bar.update()
            finally:
                cache.cleanup()
    finally:
        bar.close()
        if staged is not None:
            staged.close()
    seconds = time.perf_counter() - start
    if not np.all(np.isfinite(sens[[l for l, _ in todo]][:, : len(options)])):
        raise RuntimeError("a sensitivity is not finite (NaN/Inf model outputs with a quantized layer?)")
    problem = AllocationProblem(layer_names=names, options=skeleton.options, sensitivity=sens,
                                num_params=skeleton.num_params, macs=skeleton.macs, pinned=skeleton.pinned)
    logger.info("measured %d sensitivities (%d layers x %d options) in %.1f s", len(todo) * len(options),
                len(todo), len(options), seconds)
    if path is not None:
        _save_cache(path, fingerprint, problem, seconds)
    return problem
