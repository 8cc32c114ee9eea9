"""Bias correction (no backprop) and bias tuning (biases only, KL to the FP logits)."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..adaquant.cache import capture_layer_io
from ..calibrate import qmodules
from ..utils.batches import Batch, call_model
from ..utils.seeding import make_generator

__all__ = ["correct_bias", "output_tensors", "tune_bias"]


def _channel_mean(t: torch.Tensor, conv: bool) -> torch.Tensor:
    """Mean per output channel: dim 1 for conv outputs (N, C, H, W), last dim for linear outputs."""
    if conv:
        return t.transpose(0, 1).reshape(t.shape[1], -1).mean(dim=1)
    return t.reshape(-1, t.shape[-1]).mean(dim=0)


@torch.no_grad()
def correct_bias(
    qmodel: nn.Module, fp_model: nn.Module, layer_names: Sequence[str], batches: Sequence[Batch], *,
    progress: bool = False,
) -> dict[str, float]:
    """Shift each layer's bias by the mean per-channel error of its output, in execution order.

    Each layer sees inputs from the already-corrected quantized prefix, so corrections do not double count.
    Returns the mean absolute shift per layer.
    """
    shifts: dict[str, float] = {}
    for name in tqdm(layer_names, desc="bias correction", disable=not progress, leave=False):
        layer = qmodel.get_submodule(name)
        cache = capture_layer_io(qmodel, fp_model, name, batches, dtype=torch.float32)
        conv = layer.weight.dim() == 4
        total, count = None, 0
        for x, y in cache.iterate(256):
            x, y = x.to(layer.weight.device), y.to(layer.weight.device)
            err = _channel_mean(y - layer(x), conv) * len(x)
            total = err if total is None else total + err
            count += len(x)
        cache.cleanup()
        delta = total / count
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


