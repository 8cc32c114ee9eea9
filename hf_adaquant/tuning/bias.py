"""Bias correction (no backprop) and bias tuning (biases only, KL to the FP logits)."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adaquant.cache import capture_layer_outputs, observe_outputs
from ..calibrate import qmodules
from ..utils.batches import Batch, call_model
from ..utils.seeding import make_generator

__all__ = ["correct_bias", "output_tensors", "tune_bias"]


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
    progress: bool = False,
) -> dict[str, float]:
    """Shift each layer's bias by the mean per-channel error of its output, in execution order.

    Each layer sees inputs from the already-corrected quantized prefix, so corrections do not double count.
    The FP targets take one pass for all layers; each layer then costs one quantized forward that stops right
    after it. Returns the mean absolute shift per layer.
    """
    conv = {name: qmodel.get_submodule(name).weight.dim() == 4 for name in layer_names}
    fp_means = _fp_channel_means(fp_model, layer_names, batches, conv)
    shifts: dict[str, float] = {}
    for name in tqdm(layer_names, desc="bias correction", disable=not progress, leave=False):
        layer = qmodel.get_submodule(name)
        q_mean = _ChannelMean(conv[name])
        capture_layer_outputs(qmodel, name, batches, q_mean.add)
        delta = (fp_means[name] - q_mean.mean).to(layer.bias.dtype).to(layer.bias.device)
        layer.bias.add_(delta)
        shifts[name] = delta.abs().mean().item()
    return shifts


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, tuple, dict or transformers ModelOutput), loss excluded."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for k, v in out.items() if k != "loss" for t in output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in output_tensors(v)]
    return []


def _kl(q_out: list[torch.Tensor], fp_out: list[torch.Tensor]) -> torch.Tensor:
    loss = q_out[0].new_zeros(())
    for q, p in zip(q_out, fp_out):
        q2, p2 = q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1])
        loss = loss + F.kl_div(F.log_softmax(q2, -1), F.log_softmax(p2, -1), log_target=True,
                               reduction="batchmean")
    return loss


def tune_bias(
    qmodel: nn.Module, fp_model: nn.Module, batches: Sequence[Batch], *, steps: int = 200, lr: float = 1e-4,
    seed: int = 0, progress: bool = False,
) -> tuple[float, float]:
    """Train only the quantized layers' biases so the model's outputs match the FP outputs (KL over the last dim).

    Kept only if it lowers the KL on the calibration batches. Returns ``(kl_before, kl_after)``.
    """
    with torch.no_grad():
        targets = [[t.detach() for t in output_tensors(call_model(fp_model.eval(), b))] for b in batches]

    def total_kl() -> float:
        with torch.no_grad():
            return sum(_kl(output_tensors(call_model(qmodel, b)), t).item() for b, t in zip(batches, targets))

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
        for i in tqdm(range(steps), desc="bias tuning", disable=not progress, leave=False):
            k = order[i % len(order)]
            loss = _kl(output_tensors(call_model(qmodel, batches[k])), targets[k])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
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


