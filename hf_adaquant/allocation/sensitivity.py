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

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..adaquant.cache import IOCache, capture_layer_io
from ..adaquant.layerwise import init_input_range, optimize_layer
from ..adaquant.staged import StagedRunner
from ..calibrate import init_weight_range
from ..config import AdaQuantConfig
from ..nn import quantize_module
from ..prepare import FoldResult, prepare_model
from ..utils.batches import Batch, materialize_batches
from ..utils.logging import progress_bar
from ..utils.modules import set_submodule
from ..utils.seeding import make_generator
from .budget import bits_of_option, build_problem, candidate_options, check_budget, policy_pins
from .criteria import TASK_NEEDS_LABELS, Criterion, LossFn, split_labels
from .ilp import AllocationProblem, BitOption
from .sensitivity_cache import (SENSITIVITY_ADVANCED_FIELDS, SENSITIVITY_CACHE_VERSION, SENSITIVITY_FIELDS,
                                hash_data, hash_model, load_cache, save_cache, sensitivity_fingerprint)

__all__ = ["SENSITIVITY_ADVANCED_FIELDS", "SENSITIVITY_CACHE_VERSION", "SENSITIVITY_FIELDS", "LossFn",
           "measure_sensitivity", "sensitivity_fingerprint"]

logger = logging.getLogger(__name__)


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
        raise ValueError(TASK_NEEDS_LABELS)
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
            config, names, model_hash=hash_model(model), data_hash=hash_data(batches),
            labels_hash=hash_data(split_labels(labels, batches)) if labels is not None else "", loss_fn=loss_fn,
            max_eval_samples=max_eval_samples)
        cached = load_cache(path, fingerprint)
        if cached is not None:
            return cached

    start = time.perf_counter()
    criterion = Criterion(config.sensitivity_criterion, fp_model, batches, labels, loss_fn, max_eval_samples)
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
            float_layer = fp_model.get_submodule(name)
            cache = staged.capture(name) if staged is not None else capture_layer_io(
                fp_model, fp_model, name, batches, dtype=dtype, max_bytes=config.max_cache_bytes)
            try:
                for k, option in enumerate(options):
                    bar.set_postfix_str(f"{name} {option.label}")
                    qlayer = _fit_layer(float_layer, name, index, option, prepared.fold, cache, config)
                    set_submodule(fp_model, name, qlayer)
                    try:
                        sens[index, k] = criterion(fp_model)
                    finally:
                        set_submodule(fp_model, name, float_layer)
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
        save_cache(path, fingerprint, problem, seconds)
    return problem
