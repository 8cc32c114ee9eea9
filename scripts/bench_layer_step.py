#!/usr/bin/env python
"""Time of one AdaQuant optimisation step on representative layers against its FLOP bound (issue 14, item 3).

Layers: a 3x3 conv 64->64 at 32x32 (ResNet-20/56 body, 1000 cached samples) and a 768x768 Linear on 384 tokens
(BERT-base / MiniLM width). Each runs ``optimize_layer`` at the default config (W4A8, batch 50 capped by
``max_step_elements``) under a :class:`RunProfile`; a step's time is the "optimisation" phase (checkpoint
evaluations excluded) divided by the iterations. Variants run interleaved in one process; the best of
``--repeats`` runs counts.

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_layer_step.py [--clock cpu] [--repeats 3] [--variants before after]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from hf_adaquant import AdaQuantConfig
from hf_adaquant.adaquant.cache import IOCache
from hf_adaquant.adaquant.layerwise import optimize_layer
from hf_adaquant.nn import quantize_module
from hf_adaquant.utils.profiling import RunProfile, measure_throughput
from hf_adaquant.utils.seeding import make_generator


def _build(kind: str, samples: int) -> tuple[nn.Module, IOCache]:
    torch.manual_seed(0)
    if kind == "conv":
        fp = nn.Conv2d(64, 64, 3, padding=1)
        make_x = lambda n: torch.relu(torch.randn(n, 64, 32, 32))  # noqa: E731 (post-ReLU activations)
        activation = "relu"
    else:
        fp = nn.Linear(768, 768)
        make_x = lambda n: F.gelu(torch.randn(n, 384, 768))  # noqa: E731
        activation = None
    cache = IOCache(torch.float16, max_bytes=16 << 30, name=kind)
    with torch.no_grad():
        for start in range(0, samples, 100):  # calibration batches of 100
            x = make_x(min(100, samples - start))
            cache.x.append(x)
            cache.y.append(fp(x))
    cache.finalize()
    layer = quantize_module(fp, 4, 8)
    layer.output_activation = activation
    return layer, cache


# name: fused fake quantization. Channels-last steps were tried too: no gain on the whole step (conv 64->64 at
# 32x32: 187 vs 182 ms CPU), though a bare oneDNN conv forward + backward is faster in it; not kept.
VARIANTS = {"before": False, "after": True}


def _apply(variant: str) -> None:
    """Switch the process to a variant (the library's own functions, swapped in place)."""
    from hf_adaquant.quant import functional, quantizer

    quantizer.fake_quantize = functional.fake_quantize if VARIANTS[variant] else functional.fake_quantize_reference


def run_once(layer0: nn.Module, cache: IOCache, iterations: int, clock: str) -> dict:
    """One ``optimize_layer`` run on a fresh copy of ``layer0``: seconds per step and bound per step."""
    layer = copy.deepcopy(layer0)
    profile = RunProfile(throughput=measure_throughput(clock=clock, refresh=True, seconds=0.6), clock=clock)
    optimize_layer(layer, cache, AdaQuantConfig(iterations=iterations, seed=0), make_generator(0, 1),
                   name="bench", profile=profile)
    rec = profile.phases["optimisation"]
    sample = profile.phases["optimisation/sample"]
    return {"step_s": rec.seconds / iterations, "bound_s": profile.bound("optimisation") / iterations,
            "sample_s": sample.seconds / iterations, "gflop_per_step": rec.total_flops / iterations / 1e9}


def kernel_only(kind: str, batch: int, clock: str, repeats: int = 5) -> float:
    """Seconds of the bare fp32 forward + both backward products at the step's batch (no quantizers; NCHW)."""
    torch.manual_seed(0)
    if kind == "conv":
        x = torch.randn(batch, 64, 32, 32, requires_grad=True)
        w = torch.randn(64, 64, 3, 3, requires_grad=True)
        fn = lambda: F.conv2d(x, w, padding=1)  # noqa: E731
    else:
        x = torch.randn(batch, 384, 768, requires_grad=True)
        w = torch.randn(768, 768, requires_grad=True)
        fn = lambda: F.linear(x, w)  # noqa: E731
    times = []
    for _ in range(repeats):
        timer = time.process_time if clock == "cpu" else time.perf_counter
        start = timer()
        fn().sum().backward()
        times.append(timer() - start)
    return min(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", nargs="+", default=["conv", "linear"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: time by process CPU time (one thread on a machine shared with other jobs)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    load = [open("/proc/loadavg").read().split()[:3]]
    rows = []
    for kind in args.layers:
        layer0, cache = _build(kind, 1000 if kind == "conv" else 256)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # variants interleaved, so that a change of machine load hits all alike
            for variant in args.variants:
                _apply(variant)
                r = run_once(layer0, cache, args.iterations, args.clock)
                b = best.setdefault(variant, r)
                b["step_s"] = min(b["step_s"], r["step_s"])
                b["sample_s"] = min(b["sample_s"], r["sample_s"])
                b["bound_s"] = min(b["bound_s"], r["bound_s"])  # the best throughput seen
        cache.cleanup()
        per_sample = 64 * 32 * 32 if kind == "conv" else 384 * 768
        batch = max(1, min(50, (1 << 22) // per_sample))
        kernel = kernel_only(kind, batch, args.clock)
        bound = min(b["bound_s"] for b in best.values())
        for variant, b in best.items():
            row = {"layer": kind, "variant": variant, "batch": batch, "ms_per_step": 1e3 * b["step_s"],
                   "bound_ms": 1e3 * bound, "ratio": b["step_s"] / bound, "sample_ms": 1e3 * b["sample_s"],
                   "kernel_only_ms": 1e3 * kernel, "gflop_per_step": b["gflop_per_step"]}
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    load.append(open("/proc/loadavg").read().split()[:3])
    print(f"threads={torch.get_num_threads()}, {args.clock} clock, loadavg before/after {load}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"clock": args.clock, "threads": torch.get_num_threads(), "loadavg": load, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
