"""Prepare a model for quantization: copy, fold BatchNorms, plan bits, swap in quantized modules.

This is the first step of every pipeline (:func:`hf_adaquant.quantize`) and of the sensitivity measurement of bit
allocation (:func:`hf_adaquant.allocation.measure_sensitivity`), so it lives below both.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from ..config import AdaQuantConfig
from ..nn import quantize_module
from ..nn.qembedding import quantize_embeddings_
from ..utils.batches import Batch
from ..utils.modules import set_submodule
from .find_layers import LayerInfo, check_no_meta_tensors, plan_layer_bits, trace_layers
from .fold_bn import FoldResult, fold_batchnorms
from .residual_outputs import add_residual_output_quantizers

__all__ = ["PreparedModel", "prepare_model"]


@dataclass
class PreparedModel:
    """A folded FP reference model and its quantized twin (quantizers not yet calibrated)."""

    fp_model: nn.Module
    qmodel: nn.Module
    layers: list[LayerInfo]
    plan: dict[str, tuple[int, int | None]]
    fold: FoldResult
    residual_layers: list[str] = field(default_factory=list)  # given an output quantizer (residual_output_bits)


def prepare_model(model: nn.Module, example_batch: Batch, config: AdaQuantConfig) -> PreparedModel:
    """Copy ``model`` (never mutated), fold its BatchNorms, wrap the planned layers with quantizers and put the
    embedding tables on their ``embedding_bits`` grid."""
    check_no_meta_tensors(model)
    fp_model = copy.deepcopy(model).eval()
    fold = fold_batchnorms(fp_model, example_batch)  # each fold verified against the unfolded model on it
    for p in fp_model.parameters():
        p.requires_grad_(False)
    layers = trace_layers(fp_model, example_batch)
    plan = plan_layer_bits(layers, config.weight_bits, config.activation_bits,
                           first_last_bits=config.first_last_bits, include=config.include,
                           exclude=config.exclude, overrides=config.layer_bits)
    qmodel = copy.deepcopy(fp_model)
    for name, (wbits, abits) in plan.items():
        qlayer = quantize_module(qmodel.get_submodule(name), wbits, abits, weight_symmetric=config.weight_symmetric,
                                 activation_symmetric=config.activation_symmetric)
        qlayer.output_activation = fold.output_activations.get(name)
        qlayer.bn_target = fold.bn_targets.get(name)
        set_submodule(qmodel, name, qlayer)
    residual_layers = []
    if config.residual_output_bits is not None:
        residual_layers = add_residual_output_quantizers(fp_model, qmodel, list(plan), config.residual_output_bits,
                                                         config.activation_symmetric)
    if config.embedding_bits is not None:
        # before any calibration: every later stage then sees (and compensates) the stored tables' error
        quantize_embeddings_(qmodel, config.embedding_bits, config.exclude)
    return PreparedModel(fp_model, qmodel, layers, plan, fold, residual_layers)
