#!/usr/bin/env python
"""Distributed AdaQuant benchmark: the per-layer phase with 1 process vs N processes (torchrun, CPU, gloo).

Both runs use the same config (advanced pipeline, ``--variant``: parallel by default) and one intra-op thread per
process; the script checks that the N-process model equals the 1-process one (parallel: bitwise; sequential: it
records the largest difference, as the ranks' gradients are summed in another order) and writes
``benchmarks/results/distributed_<model>.{json,md}`` with the wall time of the per-layer phase and the speedup.
Timings only mean something on an otherwise idle machine (the load average is recorded).

Usage:
    python scripts/bench_distributed.py                               # ResNet-56, 1000 images, 2 processes
    python scripts/bench_distributed.py --calib 100 --iterations 5 --tag _smoke   # quick check that it works
    python scripts/bench_distributed.py --variant sequential --tag _sequential    # the default variant
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# sibling scripts: `python scripts/bench_distributed.py` puts scripts/ first on sys.path (no edit of it needed)
from bench_core import _git_commit, load, parse_setting

from hf_adaquant import AdaQuantConfig, prepare_model
from hf_adaquant.adaquant import run_adaquant
from hf_adaquant.distributed import get_context

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _config(args: argparse.Namespace) -> AdaQuantConfig:
    wbits, abits = parse_setting(args.setting)
    changes = {"iterations": args.iterations} if args.iterations is not None else {}
    return AdaQuantConfig(weight_bits=wbits, activation_bits=abits, pipeline="advanced", variant=args.variant,
                          seed=0, progress=False, **changes)


def worker(args: argparse.Namespace) -> None:
    """One rank: prepare the model, time ``run_adaquant`` (all ranks start together), save rank 0's result."""
    torch.set_num_threads(1)
    ctx = get_context()
    model, calib, _, _ = load(args.model, args.calib)
    config = _config(args)
    prepared = prepare_model(model, calib[0], config)
    num_samples = sum(len(b) for b in calib)
    # As quantize() does: fp16 cache size per layer, so the parallel variant captures many layers per FP pass.
    layer_bytes = {l.name: num_samples * 2 * (math.prod(l.input_shape) + math.prod(l.output_shape))
                   for l in prepared.layers}
    ctx.barrier("start")
    start = time.perf_counter()
    reports = run_adaquant(prepared.qmodel, prepared.fp_model, list(prepared.plan), calib, config, layer_bytes,
                           layer_info={l.name: l for l in prepared.layers})
    seconds = time.perf_counter() - start
    if ctx.is_main:
        torch.save({"state": prepared.qmodel.state_dict(), "seconds": seconds, "processes": ctx.world_size,
                    "layers": len(reports), "calibration_samples": num_samples, "config": config.to_dict()},
                   args.out)


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"run failed: {' '.join(cmd)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet56", choices=["resnet20", "resnet56", "efficientnet_lite0"])
    parser.add_argument("--calib", type=int, default=1000, help="calibration images")
    parser.add_argument("--iterations", type=int, default=None, help="AdaQuant steps per layer (config default)")
    parser.add_argument("--setting", default="W4A8")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--variant", default="parallel", choices=["parallel", "sequential"],
                        help="parallel: layers over ranks (bitwise equal to 1 process); sequential: each layer "
                             "data-parallel over ranks (equal up to the order gradients are summed in)")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    common = ["--model", args.model, "--calib", str(args.calib), "--setting", args.setting, "--variant", args.variant]
    if args.iterations is not None:
        common += ["--iterations", str(args.iterations)]
    with tempfile.TemporaryDirectory(prefix="hf_adaquant_bench_") as tmp:
        one, many = Path(tmp) / "one.pt", Path(tmp) / "many.pt"
        load_before = os.getloadavg()[0]
        _run([sys.executable, __file__, "--worker", "--out", str(one), *common])
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
              str(args.processes), __file__, "--worker", "--out", str(many), *common])
        a, b = torch.load(one), torch.load(many)
    max_diff = max((a["state"][k].float() - b["state"][k].float()).abs().max().item() for k in a["state"])
    equal = all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    result = {
        "model": args.model, "setting": args.setting, "calibration_samples": a["calibration_samples"],
        "layers": a["layers"], "iterations": a["config"]["iterations"], "variant": args.variant,
        "threads_per_process": 1, "processes": args.processes,
        "seconds_1_process": round(a["seconds"], 2), f"seconds_{args.processes}_processes": round(b["seconds"], 2),
        "speedup": round(a["seconds"] / b["seconds"], 3), "bitwise_equal": equal, "max_abs_diff": max_diff,
        "load_average_1min_before": load_before, "load_average_1min_after": os.getloadavg()[0],
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "commit": _git_commit(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"distributed_{args.model}{args.tag}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(
        f"Per-layer AdaQuant phase, {args.model} {args.setting}, {args.variant} variant, "
        f"{result['calibration_samples']} "
        f"calibration images, {result['iterations']} iterations/layer, 1 thread per process (CPU, gloo).\n\n"
        f"| processes | seconds | speedup | equal to 1 process |\n|---|---|---|---|\n"
        f"| 1 | {a['seconds']:.1f} | 1.00 | — |\n"
        f"| {args.processes} | {b['seconds']:.1f} | {result['speedup']:.2f} | "
        f"{'bitwise' if equal else f'max abs diff {max_diff:.2e}'} |\n\n"
        f"Load average (1 min) before/after: {load_before:.2f} / {result['load_average_1min_after']:.2f} "
        f"on {os.cpu_count()} CPUs. Commit {result['commit']}.\n")
    print(json.dumps(result, indent=2))
    if args.variant == "parallel" and not equal and max_diff > 1e-6:
        raise SystemExit("the distributed result differs from the 1-process result")


if __name__ == "__main__":
    main()
