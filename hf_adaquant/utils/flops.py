"""FLOP counts of layers and this machine's measured fp32 throughput: the two halves of a phase's lower bound.

:func:`measure_throughput` is a ~1 s micro-benchmark of dense GEMM and conv2d, cached per process, device, thread
count and clock; :func:`layer_flops` / :func:`count_flops` count a layer's or a function's multiply-adds.
:mod:`hf_adaquant.utils.profiling` divides the one by the other.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["CLOCKS", "FLOP_KINDS", "Throughput", "conv2d_flops", "count_flops", "get_clock", "layer_flops",
           "linear_flops", "measure_throughput"]

FLOP_KINDS = ("gemm", "conv")


@dataclass(frozen=True)
class Throughput:
    """Measured fp32 throughput in FLOP/s of dense GEMM and of conv2d, at ``threads`` threads on ``device``."""

    gemm: float
    conv: float
    threads: int = 1
    device: str = "cpu"
    clock: str = "wall"

    def seconds(self, flops: Mapping[str, float]) -> float:
        """Lower bound in seconds for ``{kind: flops}`` (each kind at its own throughput)."""
        unknown = set(flops) - set(FLOP_KINDS)
        if unknown:
            raise ValueError(f"unknown FLOP kind(s) {sorted(unknown)}; known: {list(FLOP_KINDS)}")
        return sum(f / getattr(self, kind) for kind, f in flops.items() if f)

    def to_dict(self) -> dict:
        return {"gemm_gflops": self.gemm / 1e9, "conv_gflops": self.conv / 1e9, "threads": self.threads,
                "device": self.device, "clock": self.clock}


_THROUGHPUT_CACHE: dict[tuple[str, int, str], Throughput] = {}


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def get_clock(name: str) -> Callable[[], float]:
    """The timer function of clock ``name`` (``"wall"`` or ``"cpu"``)."""
    if name not in CLOCKS:
        raise ValueError(f"unknown clock {name!r}; known: {list(CLOCKS)}")
    return CLOCKS[name]


def _best_rate(fn: Callable[[], object], flops: float, seconds: float, sync: Callable[[], None],
               clock: Callable[[], float]) -> float:
    """Highest FLOP/s over repeated calls of ``fn`` within ``seconds`` of wall time (after one warm-up call)."""
    fn()
    sync()
    best = math.inf
    deadline = time.perf_counter() + seconds
    calls = 0
    while calls < 3 or time.perf_counter() < deadline:
        start = clock()
        fn()
        sync()
        best = min(best, clock() - start)
        calls += 1
    return flops / max(best, 1e-9)


@torch.no_grad()
def measure_throughput(device: str | torch.device = "cpu", seconds: float = 1.0, refresh: bool = False,
                       clock: str = "wall") -> Throughput:
    """Dense fp32 GEMM and conv2d FLOP/s on ``device`` at the current ``torch.get_num_threads()``.

    The best call of each micro-benchmark counts (a bound, not an average); conv2d takes the faster of the
    contiguous and channels-last layouts. The result is cached per process, device, thread count and clock.
    ``clock="cpu"`` times by process CPU time: with one thread on a CPU shared with other jobs, it measures the
    work and not the waiting (pair it with a ``RunProfile(clock="cpu")``).
    """
    device = torch.device(device)
    timer = get_clock(clock)
    if clock == "cpu" and device.type != "cpu":
        raise ValueError("clock='cpu' times CPU work only; use clock='wall' on a GPU")
    key = (str(device), torch.get_num_threads(), clock)
    if not refresh and key in _THROUGHPUT_CACHE:
        return _THROUGHPUT_CACHE[key]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    big = device.type == "cuda"  # a GPU needs larger problems to reach its peak
    n = 4096 if big else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    gemm = _best_rate(lambda: torch.mm(a, b), 2.0 * n**3, seconds / 2, sync, timer)
    batch, channels, size = (256 if big else 16), 64, 32
    x = torch.randn(batch, channels, size, size, device=device)
    w = torch.randn(channels, channels, 3, 3, device=device)
    conv_flops = 2.0 * batch * channels * size * size * channels * 9
    conv = 0.0
    for fmt in (torch.contiguous_format, torch.channels_last):
        xf, wf = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
        conv = max(conv, _best_rate(lambda: torch.nn.functional.conv2d(xf, wf, padding=1), conv_flops,
                                    seconds / 4, sync, timer))
    result = Throughput(gemm=gemm, conv=conv, threads=key[1], device=key[0], clock=clock)
    _THROUGHPUT_CACHE[key] = result
    return result


# ---------------------------------------------------------------------------------------------------------------
# FLOP counts (multiply-add = 2 FLOPs; bias additions and elementwise work are not counted)


def linear_flops(in_features: int, out_features: int, tokens: int) -> float:
    """Forward FLOPs of a Linear layer applied to ``tokens`` rows (all leading dimensions together)."""
    return 2.0 * tokens * in_features * out_features


def _conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv2d_flops(conv: nn.Conv2d, input_shape: Sequence[int]) -> float:
    """Forward FLOPs of ``conv`` on an input of shape ``(N, C, H, W)`` (or ``(C, H, W)``)."""
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4 or shape[1] != conv.in_channels:
        raise ValueError(f"conv2d_flops: input shape {tuple(input_shape)} does not fit a Conv2d with "
                         f"{conv.in_channels} input channels")
    n, _, h, w = shape
    kh, kw = conv.kernel_size
    if conv.padding == "same":
        oh, ow = h, w
    else:
        ph, pw = (0, 0) if conv.padding == "valid" else conv.padding
        oh = _conv_output_size(h, kh, conv.stride[0], ph, conv.dilation[0])
        ow = _conv_output_size(w, kw, conv.stride[1], pw, conv.dilation[1])
    return 2.0 * n * conv.out_channels * oh * ow * (conv.in_channels // conv.groups) * kh * kw


def layer_flops(module: nn.Module, input_shape: Sequence[int], *, forward: bool = True, grad_input: bool = False,
                grad_weight: bool = False) -> tuple[str, float]:
    """``(kind, flops)`` of one pass of a Linear or Conv2d over an input of ``input_shape``.

    The backward pass costs one forward-sized product for the input gradient and one for the weight gradient;
    ask for the parts that run (``grad_input`` only when something before the layer needs a gradient).

    Raises:
        TypeError: ``module`` is neither a Linear nor a Conv2d.
    """
    passes = int(forward) + int(grad_input) + int(grad_weight)
    if isinstance(module, nn.Linear):
        tokens = math.prod(input_shape) // module.in_features
        return "gemm", passes * linear_flops(module.in_features, module.out_features, tokens)
    if isinstance(module, nn.Conv2d):
        return "conv", passes * conv2d_flops(module, input_shape)
    raise TypeError(f"layer_flops: no FLOP formula for {type(module).__name__} (Linear and Conv2d only)")


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``torch.utils.flop_counter`` counts while running ``fn()`` (forward and any backward in it)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
