"""The verbs: prepare a model, then run the light or advanced pipeline.

model -> fold BN -> find layers -> plan bits -> swap in quantized modules -> calibrate ranges / AdaQuant
-> BN tuning -> bias correction / bias tuning.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from .adaquant import LayerReport, run_adaquant
from .allocation.budget import allocate_bits, allocated_config, allocation_record
from .allocation.ilp import Allocation
from .allocation.sensitivity import measure_sensitivity
from .calibrate import calibrate_activation_ranges, init_weight_range
from .config import AdaQuantConfig
from .distributed import is_main_process
from .prepare import PreparedModel, prepare_model
from .prepare.find_layers import check_no_meta_tensors
from .report import QuantizationReport
from .tuning import activation_elements_per_sample, correct_bias, tune_batchnorm, tune_bias
from .utils.batches import Batch, batch_size, materialize_batches, split_batches
from .utils.memory import reuse_freed_memory
from .utils.profiling import current_profile
from .utils.seeding import seed_everything

# PreparedModel / prepare_model (prepare/) and QuantizationReport (report.py) are re-exported: their home before.
__all__ = ["PreparedModel", "QuantizationReport", "prepare_model", "quantize", "register_model_finalizer"]

_logger = logging.getLogger(__name__)


def quantize(model: nn.Module, calibration_data: Iterable[Batch], config: AdaQuantConfig | None = None, *,
             work_dir: str | os.PathLike | None = None) -> nn.Module:
    """Quantize a copy of ``model`` with AdaQuant on unlabeled ``calibration_data``.

    Args:
        model: any ``nn.Module`` with Conv2d/Linear layers (timm, transformers, torchvision, plain PyTorch).
        calibration_data: iterable of input batches: tensors, tuples, or dicts of tensors for transformers.
        config: bits, pipeline and hyper-parameters; defaults to ``AdaQuantConfig()`` (W4A8, advanced).
        work_dir: directory where finished AdaQuant layers are checkpointed; a re-run with the same config,
            model and data resumes there (a different run is refused). Under ``torchrun``/``accelerate launch``
            every rank calls ``quantize`` and gets the same model (see :mod:`hf_adaquant.distributed`).

    Returns:
        A new model with the same call signature whose Conv2d/Linear layers are fake-quantized modules. The run's
        report is attached as ``model.hf_adaquant_report``.

    Example:
        >>> qmodel = quantize(model, [x[:100] for x in batches], AdaQuantConfig(weight_bits=4, activation_bits=4,
        ...                   pipeline="advanced", seed=0))
    """
    with reuse_freed_memory():  # large per-step tensors: reuse freed memory instead of page-faulting anew
        return _quantize(model, calibration_data, config, work_dir)


def _quantize(model: nn.Module, calibration_data: Iterable[Batch], config: AdaQuantConfig | None,
              work_dir: str | os.PathLike | None) -> nn.Module:
    config = config or AdaQuantConfig()
    config.validate()
    check_no_meta_tensors(model)  # before reading any data: a model without values cannot be calibrated
    if config.progress and not is_main_process():  # one set of progress bars per distributed launch
        config = config.replace(progress=False)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        if (profile := current_profile()) is not None:  # the top-level stages beside the per-layer phases
            profile.add_seconds(f"pipeline/{stage}", now - clock)
        clock = now

    seed_everything(config.seed)
    batches = materialize_batches(calibration_data, config.max_calibration_samples)
    allocation = None
    if config.has_budget and not config.layer_bits:  # bit allocation: measure, solve, then per-layer bits
        budgeted = config  # the allocated config has layer_bits and no budget; the report keeps the budget
        config, allocation = allocate_for_config(model, batches, config)
        allocation = allocation_record(allocation, budgeted)
        seed_everything(config.seed)
        lap("bit_allocation")
    prepared = prepare_model(model, batches[0], config)
    fp_model, qmodel = prepared.fp_model, prepared.qmodel
    layer_names = list(prepared.plan)
    lap("prepare")
    report = QuantizationReport(config=config.to_dict(), plan={k: list(v) for k, v in prepared.plan.items()},
                                allocation=allocation,
                                folded_batchnorms=dict(prepared.fold.folded))

    if config.pipeline == "advanced":
        num_samples = sum(batch_size(b) for b in batches)
        element_size = 2 if config.cache_dtype == "float16" else 4
        layer_bytes = {l.name: num_samples * element_size * (math.prod(l.input_shape) + math.prod(l.output_shape))
                       for l in prepared.layers}
        reports: list[LayerReport] = run_adaquant(qmodel, fp_model, layer_names, batches, config, layer_bytes,
                                                   layer_info={l.name: l for l in prepared.layers},
                                                   work_dir=work_dir)
        report.layers = [r.to_dict() for r in reports]
        lap("adaquant")
    else:
        for name in layer_names:
            init_weight_range(qmodel.get_submodule(name), config.weight_range_method, name)
        calibrate_activation_ranges(qmodel, batches, config.activation_range_method, seed=config.seed,
                                    progress=config.progress)
        lap("calibrate_ranges")
    if config.bn_tuning:
        report.bn_tuned_layers = tune_batchnorm(qmodel, batches, fp_model=fp_model, progress=config.progress)
        lap("bn_tuning")
    if config.pipeline == "light" and config.bias_correction:
        correct_bias(qmodel, fp_model, layer_names, batches, method=config.bias_correction_method,
                     progress=config.progress, max_cache_bytes=config.max_cache_bytes)
        lap("bias_correction")
    if config.pipeline == "advanced" and config.bias_tuning and config.bias_tuning_steps > 0:
        micro_batches = split_batches(batches, config.bias_tuning_batch_size)
        per_sample = activation_elements_per_sample(qmodel, micro_batches[0])
        report.bias_tuning_kl = tune_bias(qmodel, fp_model, micro_batches, steps=config.bias_tuning_steps,
                                          lr=config.bias_tuning_lr, seed=config.seed,
                                          max_backprop_samples=max(1, config.bias_tuning_max_elements // per_sample),
                                          progress=config.progress)
        lap("bias_tuning")
    qmodel.eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    report.stage_seconds = timings
    if (profile := current_profile()) is not None:
        report.profile = profile.to_dict()
    qmodel.hf_adaquant_report = report
    for finalize in list(_MODEL_FINALIZERS.values()):
        finalize(qmodel)
    return qmodel


def allocate_for_config(
    model: nn.Module, batches: Sequence[Any], config: AdaQuantConfig
) -> tuple[AdaQuantConfig, Allocation]:
    """What :func:`quantize` does with a budget: measure, solve, return the config with ``layer_bits``.

    The returned config has the allocated ``layer_bits`` and no budget (a config may not hold both: the budget
    is spent); :func:`~hf_adaquant.allocation.budget.allocation_record` keeps the budget next to the allocation in
    the run's report. An infeasible budget raises before any sensitivity is measured.
    """
    problem = measure_sensitivity(model, batches, config, progress=config.progress)
    allocation = allocate_bits(problem, config)
    return allocated_config(config, allocation), allocation


# Integrations adapt a returned model to their library (e.g. transformers: save_pretrained writes the quantized
# format) without this module importing them: they register here, quantize() calls them (dependency inversion).
_MODEL_FINALIZERS: dict[str, Callable[[nn.Module], None]] = {}


def register_model_finalizer(finalizer: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Have :func:`quantize` call ``finalizer(qmodel)`` on every model it returns (after the report is attached).

    A finalizer acts only on the models it knows (checks their type). Registering a function of the same module
    and name again replaces it, so reloading an integration does not run it twice.
    """
    _MODEL_FINALIZERS[f"{finalizer.__module__}.{finalizer.__qualname__}"] = finalizer
    return finalizer
