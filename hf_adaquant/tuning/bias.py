"""Bias correction (no backprop) and bias tuning (biases only, KL to the FP logits)."""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adaquant.cache import capture_layer_outputs, observe_outputs
from ..adaquant.staged import StagedRunner
from ..calibrate import qmodules
from ..config import BIAS_CORRECTION_METHODS
from ..utils.batches import Batch, batch_size, call_model, slice_batch
from ..utils.hooks import hooks
from ..utils.logging import progress_bar
from ..utils.modules import eval_mode
from ..utils.seeding import make_generator

__all__ = ["activation_elements_per_sample", "correct_bias", "kl_divergence", "output_tensors", "tune_bias"]

_logger = logging.getLogger(__name__)


def _channel_mean(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """Mean per output channel: dim 1 for conv outputs (N, C, H, W), last dim for linear outputs."""
    if conv:
        return t.transpose(0, 1).reshape(t.shape[1], -1).mean(dim=1)
    return t.reshape(-1, t.shape[-1]).mean(dim=0)


class _ChannelMean:
    """Running per-output-channel mean of a layer's outputs (float32 per batch, float64 across batches)."""

    def __init__(self, conv: bool) -> None:
        self.conv, self.total, self.count = conv, None, 0

    def add(self, out: torch.Tensor) -> None:
        n = out.numel() // (out.shape[1] if self.conv else out.shape[-1])
        s = _channel_mean(out.detach().float(), self.conv).double() * n
        self.total = s if self.total is None else self.total + s
        self.count += n

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count


@torch.no_grad()
def _fp_channel_means(fp_model: nn.Module, layer_names: Sequence[str], batches: Sequence[Batch],
                      conv: dict[str, bool]) -> dict[str, torch.Tensor]:
    """Output channel means of every named layer of the FP model, all from one pass over ``batches``."""
    means = {name: _ChannelMean(conv[name]) for name in layer_names}
    observe_outputs(fp_model.eval(), layer_names, batches, lambda name, out: means[name].add(out))
    return {name: acc.mean for name, acc in means.items()}


@torch.no_grad()
def correct_bias(
    qmodel: nn.Module, fp_model: nn.Module, layer_names: Sequence[str], batches: Sequence[Batch], *,
    method: str = "single_pass", progress: bool = False, max_cache_bytes: int = 4 << 30,
) -> dict[str, float]:
    """Shift each layer's bias by the mean per-channel error of its output, in execution order.

    Each layer sees inputs from the already-corrected quantized prefix, so corrections do not double count.
    ``"per_layer"`` measures each layer's error exactly over all batches before moving on: one run of the
    layer's stage per layer and batch where the model has stages (:mod:`hf_adaquant.adaquant.staged`; boundary
    activations within ``max_cache_bytes``, spilled past it), one quantized forward of the whole prefix otherwise
    (cost grows with the square of the depth). ``"single_pass"`` corrects every layer
    inside one quantized forward per batch, keeping a running average of each layer's correction across
    batches (cost: one FP and one quantized pass). Returns the mean absolute shift per layer.
    """
    if method not in BIAS_CORRECTION_METHODS:
        raise ValueError(f"bias correction method must be one of {BIAS_CORRECTION_METHODS}, got {method!r}")
    conv = {name: qmodel.get_submodule(name).weight.dim() == 4 for name in layer_names}
    if method == "single_pass":
        deltas = _correct_bias_single_pass(qmodel, fp_model, layer_names, batches, conv, progress)
        return {name: d.abs().mean().item() for name, d in deltas.items()}
    fp_means = _fp_channel_means(fp_model, layer_names, batches, conv)
    shifts: dict[str, float] = {}
    # Stage by stage where the model has stages: each layer's outputs come from one run of its own block on the
    # corrected prefix's boundary, not from a whole prefix per layer.
    staged, why = StagedRunner.for_model(qmodel, None, layer_names, batches, max_bytes=max_cache_bytes,
                                         plan_model=fp_model)
    if staged is None:
        _logger.info("per-layer bias correction runs the whole prefix per layer: %s", why)
    try:
        for name in progress_bar(layer_names, desc="bias correction", disable=not progress, leave=False):
            layer = qmodel.get_submodule(name)
            q_mean = _ChannelMean(conv[name])
            if staged is not None:
                staged.observe(name, q_mean.add)
            else:
                capture_layer_outputs(qmodel, name, batches, q_mean.add)
            delta = (fp_means[name] - q_mean.mean).to(layer.bias.dtype).to(layer.bias.device)
            layer.bias.add_(delta)
            shifts[name] = delta.abs().mean().item()
    finally:
        if staged is not None:
            staged.close()
    return shifts


def _correct_bias_single_pass(
    qmodel: nn.Module, fp_model: nn.Module, layer_names: Sequence[str], batches: Sequence[Batch],
    conv: dict[str, bool], progress: bool,
) -> dict[str, torch.Tensor]:
    """Per batch: FP channel means of every layer, then one quantized forward whose hooks correct each layer.

    At a layer, the batch's residual error (FP mean minus quantized mean, both on this batch: paired, so little
    noise) plus the layer's current correction is one estimate of the total correction it needs; the correction
    becomes the value-weighted average of these estimates so far, the bias moves to it, and the layer's output
    moves with it so that later layers of the same forward already see the corrected prefix.
    """
    qmodel.eval()
    fp_model.eval()
    start = {name: qmodel.get_submodule(name).bias.detach().clone() for name in layer_names}
    estimate_sum: dict[str, torch.Tensor] = {}
    estimate_count: dict[str, int] = {}
    fp_means: dict[str, torch.Tensor] = {}

    def record_fp(name: str, out: torch.Tensor) -> None:
        fp_means[name] = _channel_mean(out.detach().float(), conv[name])

    def correct(module: nn.Module, args: Any, out: torch.Tensor, name: str) -> torch.Tensor:
        if name not in fp_means:  # called twice per forward (shared module): only the first call corrects
            return out
        n = out.numel() // (out.shape[1] if conv[name] else out.shape[-1])
        current = module.bias.detach().double() - start[name].double()
        estimate = current + (fp_means.pop(name).double() - _channel_mean(out.detach().float(), conv[name]).double())
        estimate_sum[name] = estimate_sum.get(name, 0) + estimate * n
        estimate_count[name] = estimate_count.get(name, 0) + n
        target = estimate_sum[name] / estimate_count[name]
        step = (target - current).to(module.bias.dtype)
        module.bias.add_(step)
        shape = (1, -1) + (1,) * (out.dim() - 2) if conv[name] else (-1,)
        return out + step.reshape(shape).to(out.dtype)

    correcting = ((qmodel.get_submodule(name), lambda mod, args, out, name=name: correct(mod, args, out, name))
                  for name in layer_names)
    with hooks(correcting):
        for batch in progress_bar(batches, desc="bias correction", disable=not progress, leave=False):
            fp_means.clear()
            observe_outputs(fp_model, layer_names, [batch], record_fp)
            call_model(qmodel, batch)
    return {name: qmodel.get_submodule(name).bias.detach() - start[name] for name in layer_names}


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, tuple, dict or transformers ModelOutput), loss excluded."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for k, v in out.items() if k != "loss" for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


def kl_divergence(q_out: list[torch.Tensor], fp_out: list[torch.Tensor]) -> torch.Tensor:
    """Sum over output tensors of KL(FP || quantized) over the last dimension (batch mean): bias tuning's loss."""
    loss = q_out[0].new_zeros(())
    for q, p in zip(q_out, fp_out):
        q2, p2 = q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1])
        loss = loss + F.kl_div(F.log_softmax(q2, -1), F.log_softmax(p2, -1), log_target=True,
                               reduction="batchmean")
    return loss


@torch.no_grad()
def activation_elements_per_sample(model: nn.Module, batch: Batch) -> int:
    """Output values per sample of every leaf module and quantized layer, measured on two samples of ``batch``.

    Roughly what a backward pass keeps alive per sample: it sizes the slices that bound bias tuning's memory.
    Outputs without the batch dimension (e.g. fake-quantized weights) do not grow with the batch and are skipped.
    """
    n = min(2, batch_size(batch))
    quantized = set(qmodules(model).values())
    total = 0

    def count(module: nn.Module, args: Any, out: Any) -> None:
        nonlocal total
        total += sum(t.numel() for t in output_tensors(out) if t.dim() and t.shape[0] == n)

    counted = ((m, count) for m in model.modules() if m in quantized or not any(m.children()))
    with hooks(counted), eval_mode(model):
        call_model(model, slice_batch(batch, 0, n))
    return max(total // n, 1)


def tune_bias(
    qmodel: nn.Module, fp_model: nn.Module, batches: Sequence[Batch], *, steps: int = 200, lr: float = 1e-4,
    seed: int = 0, max_backprop_samples: int | None = None, progress: bool = False,
) -> tuple[float, float]:
    """Train only the quantized layers' biases so the model's outputs match the FP outputs (KL over the last dim).

    Each step backpropagates through at most ``max_backprop_samples`` samples at once; a larger batch
    accumulates the gradient over slices (the same gradient, bounded memory). Kept only if it lowers the KL on
    the calibration batches. Returns ``(kl_before, kl_after)``.
    """
    with torch.no_grad():
        targets = [[t.detach() for t in output_tensors(call_model(fp_model.eval(), b))] for b in batches]

    def total_kl() -> float:
        with torch.no_grad():
            return sum(kl_divergence(output_tensors(call_model(qmodel, b)), t).item() for b, t in zip(batches, targets))

    biases = [m.bias for m in qmodules(qmodel).values()]
    params = list(qmodel.parameters())
    requires = [p.requires_grad for p in params]
    qmodel.eval()
    before = total_kl() / len(batches)
    saved = copy.deepcopy([b.detach() for b in biases])
    generator = make_generator(seed, 7919)
    try:
        for p in params:
            p.requires_grad_(False)
        for b in biases:
            b.requires_grad_(True)
        optimizer = torch.optim.Adam(biases, lr=lr)
        order = torch.randperm(len(batches), generator=generator).tolist()
        for i in progress_bar(range(steps), desc="bias tuning", disable=not progress, leave=False):
            k = order[i % len(order)]
            optimizer.zero_grad(set_to_none=True)
            n = batch_size(batches[k])
            size = n if max_backprop_samples is None else max(1, min(max_backprop_samples, n))
            for start in range(0, n, size):
                stop = min(start + size, n)
                batch = slice_batch(batches[k], start, stop)  # views: the whole batch when size == n
                # batchmean KL of the whole batch = slice KLs weighted by their share of the samples
                loss = kl_divergence(output_tensors(call_model(qmodel, batch)), [t[start:stop] for t in targets[k]])
                (loss * ((stop - start) / n)).backward()
            optimizer.step()
    finally:
        for p, r in zip(params, requires):
            p.requires_grad_(r)
            p.grad = None
    after = total_kl() / len(batches)
    if not after < before:
        with torch.no_grad():
            for b, s in zip(biases, saved):
                b.copy_(s)
        after = before
    return before, after


