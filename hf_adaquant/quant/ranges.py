"""Range initialisation: pick ``[lo, hi]`` for a quantizer from data.

Methods register by name (``register_range_method``). Each takes ``x`` of shape ``(C, N)`` for per-channel ranges
(one row per channel) or ``(1, N)`` per tensor, plus ``bits``/``symmetric``, and returns ``(lo, hi)`` of shape
``(C,)``. ``mean_minmax`` needs per-sample extremes, which a :class:`RangeObserver` streams for activations.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .functional import fake_quantize, qparams_from_range, qrange

__all__ = ["RANGE_METHODS", "NonFiniteValuesError", "RangeObserver", "compute_range", "register_range_method"]

class NonFiniteValuesError(ValueError):
    """Data for a range holds NaN or inf."""


RangeFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
RANGE_METHODS: dict[str, RangeFn] = {}


def register_range_method(name: str) -> Callable[[RangeFn], RangeFn]:
    """Register a range method under ``name``; duplicates raise."""

    def wrap(fn: RangeFn) -> RangeFn:
        if name in RANGE_METHODS:
            raise ValueError(f"range method {name!r} is already registered")
        RANGE_METHODS[name] = fn
        return fn

    return wrap


@register_range_method("minmax")
def minmax_range(x: torch.Tensor, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    return x.amin(dim=1), x.amax(dim=1)


@register_range_method("percentile")
def percentile_range(
    x: torch.Tensor, percentile: float = 99.99, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=torch.float32, device=x.device)
    bounds = torch.quantile(x.float(), q, dim=1)  # quantile() is limited to 16M elements: callers subsample
    return bounds[0], bounds[1]


@register_range_method("mse")
def mse_range(
    x: torch.Tensor, bits: int, symmetric: bool, num_candidates: int = 40, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink the min-max range by the ratio in ``[0.2, 1]`` that minimises ``||x - Q(x)||^2``, per row."""
    x = x.float()
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for ratio in torch.linspace(1.0, 0.2, num_candidates):
        c_lo, c_hi = lo * ratio, hi * ratio
        scale, zp, signed = qparams_from_range(c_lo, c_hi, bits, symmetric)
        qmin, qmax = qrange(bits, signed)
        err = (fake_quantize(x, scale[:, None], zp[:, None], qmin, qmax) - x).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    return best_lo, best_hi


def compute_range(
    method: str, x: torch.Tensor, bits: int, symmetric: bool, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of ``x`` (rows = channels) by the registered ``method``."""
    if method not in RANGE_METHODS:
        raise ValueError(f"unknown range method {method!r}; accepted: {sorted(RANGE_METHODS) + ['mean_minmax']}")
    return RANGE_METHODS[method](x, bits=bits, symmetric=symmetric, **kwargs)


class RangeObserver:
    """Streams activation statistics over calibration batches in bounded memory.

    Keeps the global min/max, the running sum of each sample's min/max (the paper's "mean of per-sample min-max")
    and a uniform random subsample of at most ``max_values`` values for the ``mse`` and ``percentile`` methods.
    """

    def __init__(self, max_values: int = 1 << 20, seed: int = 0) -> None:
        self.max_values = max_values
        self.generator = torch.Generator().manual_seed(seed)
        self.min = float("inf")
        self.max = float("-inf")
        self.sum_sample_min = 0.0
        self.sum_sample_max = 0.0
        self.num_samples = 0
        self._values: list[torch.Tensor] = []
        self._per_batch = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Observe one mini-batch (first dimension: samples)."""
        self.update_parts([x], x.numel())

    @torch.no_grad()
    def update_parts(self, parts: Iterable[torch.Tensor], numel: int) -> None:
        """Observe one mini-batch given as consecutive slices of whole samples, holding one slice at a time.

        Same statistics, bit for bit, as :meth:`update` on the concatenation of ``parts`` (``numel`` values in
        all): the subsample's positions are drawn over the whole mini-batch before any slice is read. A range
        initialisation of 256 samples of a resnet50 ``layer1`` input would otherwise hold 822 MB in float32.
        """
        if not self._per_batch:  # a fixed share per batch: bounded memory without knowing the number of batches
            self._per_batch = max(1, self.max_values // 64)
        take = min(self._per_batch, numel)
        idx = torch.randint(0, numel, (take,), generator=self.generator)
        values = torch.empty(take, dtype=torch.float32)
        sample_mins, sample_maxs = [], []
        offset = 0
        for part in parts:
            flat = part.detach().float().reshape(part.shape[0], -1)
            sample_mins.append(flat.amin(dim=1).cpu())
            sample_maxs.append(flat.amax(dim=1).cpu())
            inside = (idx >= offset) & (idx < offset + flat.numel())
            values[inside] = flat.reshape(-1)[(idx[inside] - offset).to(flat.device)].cpu()
            offset += flat.numel()
        if offset != numel:
            raise ValueError(f"the parts hold {offset} values, not the {numel} announced")
        sample_min, sample_max = torch.cat(sample_mins), torch.cat(sample_maxs)
        # amin/amax propagate NaN: checking the extremes finds any NaN or inf. Python's min()/max() below would
        # silently drop a NaN.
        if not (torch.isfinite(sample_min).all() and torch.isfinite(sample_max).all()):
            raise NonFiniteValuesError("activations contain NaN or inf values")
        self.min = min(self.min, sample_min.min().item())
        self.max = max(self.max, sample_max.max().item())
        self.sum_sample_min += sample_min.sum().item()
        self.sum_sample_max += sample_max.sum().item()
        self.num_samples += sample_min.numel()
        self._values.append(values)
        if sum(v.numel() for v in self._values) > self.max_values:
            merged = torch.cat(self._values)
            keep = torch.randperm(merged.numel(), generator=self.generator)[: self.max_values // 2]
            self._values = [merged[keep]]

    def compute(self, method: str, bits: int, symmetric: bool, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor ``(lo, hi)`` as 1-element tensors."""
        if self.num_samples == 0:
            raise RuntimeError("RangeObserver saw no data")
        if method == "minmax":
            return torch.tensor([self.min]), torch.tensor([self.max])
        if method == "mean_minmax":
            n = self.num_samples
            return torch.tensor([self.sum_sample_min / n]), torch.tensor([self.sum_sample_max / n])
        values = torch.cat(self._values)[None, :]
        lo, hi = compute_range(method, values, bits=bits, symmetric=symmetric, **kwargs)
        return lo, hi
