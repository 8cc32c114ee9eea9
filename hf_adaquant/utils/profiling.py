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
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

from .flops import (CLOCKS, FLOP_KINDS, Throughput, conv2d_flops, count_flops, get_clock, layer_flops, linear_flops,
                    measure_throughput)

# Throughput, measure_throughput and the FLOP counters live in .flops; re-exported here, where callers import them.
__all__ = ["CLOCKS", "FLOP_KINDS", "PhaseRecord", "RunProfile", "Throughput", "add_flops", "conv2d_flops",
           "count_flops", "current_profile", "layer_flops", "linear_flops", "measure_throughput", "phase",
           "profiling"]

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
        self._timer = get_clock(clock)
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
