#!/usr/bin/env python
"""One onnxruntime latency measurement in a fresh process (run by ``bench_onnx.py --latency``).

Imports only numpy and onnxruntime (no torch), so the process's peak RSS is what an onnxruntime deployment of the
file holds: the runtime, the session (initializers, optimised graph, kernels' packed weights) and one batch's
activations. Prints ``RESULT {json}``: median and 90th-percentile latency in ms over ``--runs`` runs after
``--warmup`` runs, the session's load time, and peak RSS in MiB.

    python scripts/ort_worker.py model.onnx --batch 8 --threads 2 [--seq-len 384]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort

_INT_FILL = {"attention_mask": 1, "token_type_ids": 0}


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``: per address space, so unlike ``ru_maxrss`` it does not
    inherit the high-water mark of the parent that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def make_inputs(session: ort.InferenceSession, batch: int, seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for every graph input: the first axis is the batch, other named (dynamic) axes ``seq_len``;
    token ids drawn from the vocabulary's common range, masks all ones, token types 0 then 1 (question, context)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        shape = [batch if axis == 0 else (d if isinstance(d, int) and d > 0 else seq_len)
                 for axis, d in enumerate(spec.shape)]
        if spec.type == "tensor(float)":
            feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
        elif spec.name == "token_type_ids":
            types = np.zeros(shape, dtype=np.int64)
            types[..., shape[-1] // 3:] = 1
            feeds[spec.name] = types
        elif spec.name in _INT_FILL:
            feeds[spec.name] = np.full(shape, _INT_FILL[spec.name], dtype=np.int64)
        else:
            feeds[spec.name] = rng.integers(1000, 20000, shape, dtype=np.int64)
    return feeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help=".onnx file")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (inter-op: 1)")
    parser.add_argument("--seq-len", type=int, default=384, help="length of token inputs")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimization", choices=("all", "none"), default="all",
                        help="onnxruntime graph optimisation level")
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if args.optimization == "all"
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    start = time.perf_counter()
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    load_seconds = time.perf_counter() - start
    feeds = make_inputs(session, args.batch, args.seq_len, args.seed)
    for _ in range(args.warmup):
        session.run(None, feeds)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    print("RESULT " + json.dumps({
        "median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": args.runs,
        "warmup": args.warmup, "load_seconds": load_seconds,
        "peak_rss_mib": peak_rss_mib(),
        "inputs": {k: list(v.shape) for k, v in feeds.items()}, "onnxruntime": ort.__version__}), flush=True)


if __name__ == "__main__":
    main()
