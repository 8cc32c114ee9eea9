"""Verify BatchNorm folds against the unfolded model on an example batch (in float64 where the model allows it)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..utils.batches import Batch, call_model
from .fold_apply import apply_fold, revert_fold

__all__ = ["FOLD_TOLERANCE", "SkippedFold", "Unverifiable", "find_wrong_folds", "probe_model"]

# Checked in float64, a correct fold changes the output by ~1e-13 relative; a wrong one by percents.
FOLD_TOLERANCE = 1e-5


@dataclass(frozen=True)
class SkippedFold:
    """A candidate ``conv -> BN`` fold left undone: it changed the model's output, or could not be checked."""

    conv: str
    relative_change: float  # max-abs output error / max-abs output on the example batch (NaN: not measured)
    reason: str = ""  # why it could not be checked, when it was not measured

    def __str__(self) -> str:
        if self.reason:
            return f"folding into {self.conv!r} could not be verified: {self.reason}"
        return (f"folding into {self.conv!r} changed the model's output by {self.relative_change:.3g} "
                f"(max-abs error / max-abs output; tolerance {FOLD_TOLERANCE:g})")


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output (tensor, tuple, dict or transformers ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out.detach()] if out.is_floating_point() and out.numel() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _output_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _output_tensors(v)]
    return []


def _relative_change(reference: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """max |out - reference| / max |reference| over all output tensors (inf when the outputs do not pair up)."""
    if len(out) != len(reference) or any(a.shape != b.shape for a, b in zip(out, reference)):
        return math.inf
    def wide(t: torch.Tensor) -> torch.Tensor:  # float64 stays float64: its precision is the point of the probe
        return t.to(torch.promote_types(t.dtype, torch.float32))

    error = max((wide(a) - wide(b)).abs().max().item() for a, b in zip(out, reference))
    scale = max(wide(b).abs().max().item() for b in reference)
    if not math.isfinite(error):
        return math.inf
    return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)


class Unverifiable(Exception):
    """Folding cannot be checked on the example batch (the message says why)."""


def _to_float64(batch: Batch) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, Mapping):
        return {k: _to_float64(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_float64(v) for v in batch)
    return batch


def probe_model(model: nn.Module, example_batch: Batch) -> tuple[nn.Module, Callable[[], list[torch.Tensor]],
                                                             list[torch.Tensor]]:
    """A copy of ``model`` to try the folds on, its forward on the example batch, and its unfolded output.

    The copy runs in float64 where the model allows it: float32 rounding through a deep net reaches 1e-4 relative
    (random-weight MobileNetV3) and must not be mistaken for a wrong fold; in float64 a right fold changes the
    output by ~1e-13, a wrong one by percents.
    """
    last_error: Exception | None = None
    for to_float64 in (True, False):
        probe = copy.deepcopy(model).eval()
        batch = example_batch
        if to_float64:
            probe, batch = probe.double(), _to_float64(example_batch)

        def run(probe: nn.Module = probe, batch: Batch = batch) -> list[torch.Tensor]:
            return _output_tensors(call_model(probe, batch))

        try:
            return probe, run, run()
        except Exception as exc:  # e.g. an op without float64 support: try in the model's own dtype
            last_error = exc
    raise Unverifiable(f"the model fails on the example batch: {type(last_error).__name__}: "
                        f"{str(last_error).splitlines()[0] if str(last_error) else ''}")


def _change(reference: list[torch.Tensor], run: Callable[[], list[torch.Tensor]]) -> float:
    """Relative change of the output; a fold that makes the forward pass fail is an infinite change."""
    try:
        return _relative_change(reference, run())
    except Exception:
        return math.inf


def find_wrong_folds(probe: nn.Module, pairs: list[tuple[str, str]], run: Callable[[], list[torch.Tensor]],
                      reference: list[torch.Tensor]) -> dict[str, SkippedFold]:
    """BN name -> why, for the folds that change the probe's output beyond ``FOLD_TOLERANCE``."""
    modules = dict(probe.named_modules())
    applied = [apply_fold(probe, modules, conv_name, bn_name)[1] for conv_name, bn_name in pairs]
    if _change(reference, run) <= FOLD_TOLERANCE:  # the usual case: one extra forward pass
        return {}
    for undo in reversed(applied):
        revert_fold(probe, undo)
    noise = _change(reference, run)
    if noise > FOLD_TOLERANCE:
        raise Unverifiable(f"two runs of the unfolded model on the example batch differ by {noise:.3g}: "
                            "not deterministic in eval mode?")
    # Some fold is wrong: check them one at a time, each on top of the folds kept so far.
    wrong: dict[str, SkippedFold] = {}
    for conv_name, bn_name in pairs:
        _, undo = apply_fold(probe, modules, conv_name, bn_name)
        change = _change(reference, run)
        if change > FOLD_TOLERANCE:
            revert_fold(probe, undo)
            wrong[bn_name] = SkippedFold(conv_name, change)
    return wrong
