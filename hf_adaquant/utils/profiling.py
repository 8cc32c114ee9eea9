"""Where a run's time goes, against what the machine allows.

A :class:`RunProfile` accumulates wall time and counted FLOPs per named phase (capture, optimisation, range
initialisation, evaluation, BN tuning, bias tuning, sensitivity...). Each phase's lower bound is its counted
dense-GEMM and convolution FLOPs at this machine's measured fp32 throughput (:func:`measure_throughput`, a ~1 s
micro-benchmark cached per process and thread count). ``measured / bound`` says how far a phase is from the
hardware limit; elementwise work, copies and Python overhead are what fills the gap.

Code reports into the *current* profile (a context variable) through the module-level :func:`phase` and
:func:`add_flops`, which cost one context-variable lookup when no profile is active::

    with profiling() as prof:
        qmodel = quantize(model, batches, config)
    print(prof.format_table())

Phase names containing ``/`` are parts of the phase before the slash (``optimisation/sample`` is the cache reads
inside ``optimisation``): their time is also counted in the parent.
"""

from __future__ import annotations

import contextlib
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = ["PhaseRecord", "RunProfile", "Throughput", "add_flops", "conv2d_flops", "count_flops",
           "current_profile", "layer_flops", "linear_flops", "measure_throughput", "phase", "profiling"]

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


def _clock(name: str) -> Callable[[], float]:
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
    timer = _clock(clock)
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


# ---------------------------------------------------------------------------------------------------------------
# The profile


@dataclass
class PhaseRecord:
    """Accumulated wall time, number of timed entries and counted FLOPs (by kind) of one phase."""

    seconds: float = 0.0
    calls: int = 0
    flops: dict[str, float] = field(default_factory=dict)

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


class RunProfile:
    """Wall time and FLOPs per named phase, with lower bounds from the measured machine throughput.

    Args:
        throughput: the machine throughput to bound phases with; measured on first use of :meth:`table` when
            None (and only if some phase counted FLOPs).
        clock: "wall" (default) or "cpu": process CPU time, for one-thread measurements on a shared machine.
    """

    def __init__(self, throughput: Throughput | None = None, clock: str = "wall") -> None:
        self._timer = _clock(clock)
        if throughput is not None and throughput.clock != clock:
            raise ValueError(f"the throughput was measured with the {throughput.clock!r} clock, the profile "
                             f"uses {clock!r}")
        self.clock = clock
        self.phases: dict[str, PhaseRecord] = {}
        self.throughput = throughput

    def _record(self, name: str) -> PhaseRecord:
        record = self.phases.get(name)
        if record is None:
            if not name:
                raise ValueError("a profile phase needs a non-empty name")
            record = self.phases[name] = PhaseRecord()
        return record

    @contextlib.contextmanager
    def phase(self, name: str, flops: float = 0.0, kind: str = "gemm") -> Iterator[PhaseRecord]:
        """Time the block into phase ``name`` (accumulating over entries) and count ``flops`` of ``kind``."""
        record = self._record(name)
        if flops:
            self.add_flops(name, flops, kind)
        start = self._timer()
        try:
            yield record
        finally:
            record.seconds += self._timer() - start
            record.calls += 1

    def add_flops(self, name: str, flops: float, kind: str = "gemm") -> None:
        """Count ``flops`` of ``kind`` ("gemm" or "conv") in phase ``name``."""
        if kind not in FLOP_KINDS:
            raise ValueError(f"unknown FLOP kind {kind!r}; known: {list(FLOP_KINDS)}")
        record = self._record(name)
        record.flops[kind] = record.flops.get(kind, 0.0) + float(flops)

    def add_seconds(self, name: str, seconds: float, calls: int = 1) -> None:
        """Add time measured elsewhere (e.g. by another process) to phase ``name``."""
        record = self._record(name)
        record.seconds += seconds
        record.calls += calls

    def merge(self, other: "RunProfile") -> None:
        """Add every phase of ``other`` into this profile (both timed by the same clock)."""
        if other.clock != self.clock:
            raise ValueError(f"cannot merge a {other.clock!r}-clock profile into a {self.clock!r}-clock one")
        for name, rec in other.phases.items():
            self.add_seconds(name, rec.seconds, rec.calls)
            for kind, f in rec.flops.items():
                self.add_flops(name, f, kind)

    def _throughput(self) -> Throughput:
        if self.throughput is None:
            self.throughput = measure_throughput(clock=self.clock)
        return self.throughput

    def bound(self, name: str) -> float:
        """Lower bound in seconds of phase ``name``: its FLOPs at the machine throughput (0 without FLOPs)."""
        record = self.phases[name]
        return self._throughput().seconds(record.flops) if record.total_flops else 0.0

    def table(self) -> list[dict]:
        """One row per phase (first-seen order): phase, measured_s, bound_s, ratio (None without FLOPs),
        gflop and calls."""
        rows = []
        for name, rec in self.phases.items():
            bound = self.bound(name)
            rows.append({"phase": name, "measured_s": rec.seconds, "bound_s": bound,
                         "ratio": rec.seconds / bound if bound > 0 else None,
                         "gflop": rec.total_flops / 1e9, "calls": rec.calls})
        return rows

    def format_table(self) -> str:
        """The table as aligned text, with the throughput it was bounded with."""
        rows = self.table()
        lines = [f"{'phase':<28} {'measured s':>11} {'bound s':>9} {'ratio':>7} {'GFLOP':>9} {'calls':>7}"]
        for r in rows:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            bound = "-" if r["ratio"] is None else f"{r['bound_s']:.3f}"
            lines.append(f"{r['phase']:<28} {r['measured_s']:>11.3f} {bound:>9} {ratio:>7} {r['gflop']:>9.1f} "
                         f"{r['calls']:>7}")
        if self.throughput is not None:
            t = self.throughput
            lines.append(f"(bound at {t.gemm / 1e9:.1f} GFLOP/s GEMM, {t.conv / 1e9:.1f} GFLOP/s conv2d, "
                         f"{t.threads} thread(s), {t.device}, {t.clock} clock)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able: the rows and the throughput (measured if some phase has FLOPs)."""
        rows = self.table()
        return {"phases": rows, "throughput": None if self.throughput is None else self.throughput.to_dict()}


# ---------------------------------------------------------------------------------------------------------------
# The current profile (a context variable: code deep in the engine reports without an argument threaded through)

_CURRENT: ContextVar[RunProfile | None] = ContextVar("hf_adaquant_profile", default=None)
_NULL = contextlib.nullcontext()


def current_profile() -> RunProfile | None:
    """The profile that :func:`phase` reports into, or None when profiling is off."""
    return _CURRENT.get()


@contextlib.contextmanager
def profiling(profile: RunProfile | None = None) -> Iterator[RunProfile]:
    """Make ``profile`` (a new one when None) the current profile inside the block."""
    profile = RunProfile() if profile is None else profile
    token = _CURRENT.set(profile)
    try:
        yield profile
    finally:
        _CURRENT.reset(token)


def phase(name: str, flops: float = 0.0, kind: str = "gemm") -> contextlib.AbstractContextManager:
    """Time the block into phase ``name`` of the current profile; does nothing when none is active."""
    profile = _CURRENT.get()
    return _NULL if profile is None else profile.phase(name, flops, kind)


def add_flops(name: str, flops: float, kind: str = "gemm") -> None:
    """Count FLOPs into phase ``name`` of the current profile (nothing when none is active)."""
    profile = _CURRENT.get()
    if profile is not None:
        profile.add_flops(name, flops, kind)
