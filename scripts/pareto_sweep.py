#!/usr/bin/env python
"""Mixed-precision bit allocation sweep: top-1 vs weight size for several size budgets, against uniform bits.

Sensitivities (every layer x every candidate option) are measured once and cached next to the results; each
budget is solved by integer programming, quantized with the chosen per-layer bits and evaluated. Each row is
compared with the best uniform setting (first/last layers pinned by the policy) whose size does not exceed it.

Writes ``<out-dir>/pareto_<model>.json``, ``pareto_<model>.md``, ``pareto_<model>.png`` (top-1 vs size) and
``pareto_<model>_bits_<budget>.png`` (bits per layer), and caches sensitivities in
``<out-dir>/pareto_<model>_<pipeline>_sensitivity.json``.

Usage:
    python scripts/pareto_sweep.py --model resnet20 --budgets 0.13 0.16 0.20 --pipeline advanced --calib 1000
    python scripts/pareto_sweep.py --model efficientnet_lite0 --pipeline light --calib 500
    # quick smoke test (minutes at most):
    python scripts/pareto_sweep.py --model resnet20 --pipeline light --calib 128 --eval-limit 500 --out-dir /tmp/p
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch


# a sibling script: `python scripts/pareto_sweep.py` puts scripts/ first on sys.path (no edit of it needed)
from bench_core import RESULTS, load

from hf_adaquant import AdaQuantConfig
from hf_adaquant.allocation import plot_bits_per_layer, plot_pareto
from hf_adaquant.evaluation import evaluate_classifier
from hf_adaquant.sweep import pareto_sweep


def write_markdown(path: Path, model: str, args: argparse.Namespace, rows: list[dict]) -> None:
    fp = next((r["fp_metric"] for r in rows if r.get("fp_metric") is not None), None)
    sens_s = rows[0].get("sensitivity_seconds", 0.0) if rows else 0.0
    lines = [
        f"# Mixed-precision bit allocation: {model}",
        "",
        f"pipeline {args.pipeline}, criterion {args.criterion}, {args.calib} calibration images, "
        + (f"{args.iterations} AdaQuant iterations, " if args.pipeline == "advanced" else "")
        + f"candidates W{'/'.join(map(str, args.weight_bits))} x "
        f"A{'/'.join(map(str, args.activation_bits))}, "
        f"first/last at {args.first_last_bits} bit. FP32 top-1: {fp:.2f}. Sensitivities: {sens_s:.0f} s "
        "(0 when cached). Size = weight bits of the quantized layers / FP32.",
        "",
        "| budget | predicted criterion | size fraction | mean bits | top-1 | best uniform (<= size) | uniform size "
        "| uniform top-1 | quantize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['budget']:g} | infeasible (smallest {r['min_size_budget']:.4f}) | | | | | | | |")
            continue
        u = r.get("uniform")
        uniform = (f"{u['option']} | {u['size_fraction']:.4f} | {u['metric']:.2f}" if u else "none fits | | ")
        lines.append(f"| {r['budget']:g} | {r['predicted_criterion']:.4g} | {r['size_fraction']:.4f} | "
                     f"{r['mean_weight_bits']:.2f} | {r['metric']:.2f} | {uniform} | {r['quantize_seconds']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=["resnet20", "resnet56", "efficientnet_lite0"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.13, 0.16, 0.20],
                        help="size budgets as fractions of the FP32 weight size")
    parser.add_argument("--pipeline", choices=["light", "advanced"], default="advanced")
    parser.add_argument("--calib", type=int, default=1000, help="calibration images")
    parser.add_argument("--iterations", type=int, default=500, help="AdaQuant iterations per layer (advanced)")
    parser.add_argument("--weight-bits", type=int, nargs="+", default=[2, 3, 4, 8], help="candidate weight bits")
    parser.add_argument("--activation-bits", type=int, nargs="+", default=[4, 8], help="candidate activation bits")
    parser.add_argument("--first-last-bits", type=int, default=8, help="first/last layer bits (0: no pin)")
    parser.add_argument("--criterion", choices=["kl", "mse", "task"], default="kl")
    parser.add_argument("--sens-eval-samples", type=int, default=None,
                        help="evaluate the sensitivity criterion on this many calibration images (default: all); "
                             "each (layer, option) costs one forward pass over them")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--no-uniform", action="store_true", help="skip the uniform-precision comparison")
    parser.add_argument("--config", default="", help="JSON dict of further AdaQuantConfig overrides")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model, calib, x_ev, y_ev = load(args.model, args.calib)
    if args.eval_limit is not None:
        x_ev, y_ev = x_ev[: args.eval_limit], y_ev[: args.eval_limit]
    labels = None
    if args.criterion == "task":  # the calibration labels (load() drops them): reload them in the same order
        labels = _calibration_labels(args.model, args.calib)
    config = AdaQuantConfig(
        pipeline=args.pipeline, iterations=args.iterations, seed=args.seed, progress=True,
        first_last_bits=args.first_last_bits or None, candidate_weight_bits=args.weight_bits,
        candidate_activation_bits=args.activation_bits, sensitivity_criterion=args.criterion,
        **(json.loads(args.config) if args.config else {}))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"pareto_{args.model}"
    start = time.perf_counter()
    rows = pareto_sweep(model, calib, config, args.budgets, lambda m: evaluate_classifier(m, x_ev, y_ev),
                        cache_path=args.out_dir / f"{stem}_{args.pipeline}_sensitivity.json", labels=labels,
                        max_eval_samples=args.sens_eval_samples, compare_uniform=not args.no_uniform)
    payload = {"model": args.model, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "config": config.to_dict(), "eval_samples": int(len(y_ev)), "seconds": time.perf_counter() - start,
               "rows": rows}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    write_markdown(args.out_dir / f"{stem}.md", args.model, args, rows)
    try:
        plot_pareto(rows, args.out_dir / f"{stem}.png", title=f"{args.model} ({args.pipeline})")
        for r in rows:
            if "allocation" in r:
                plot_bits_per_layer(r["allocation"], args.out_dir / f"{stem}_bits_{r['budget']:g}.png",
                                    title=f"{args.model}: budget {r['budget']:g}, top-1 {r['metric']:.2f}")
    except ImportError as exc:
        print(f"plots skipped: {exc}", file=sys.stderr)
    for r in rows:
        if "error" in r:
            print(f"budget {r['budget']:g}: {r['error']}")
            continue
        u = r.get("uniform") or {}
        print(f"budget {r['budget']:g}: size {r['size_fraction']:.4f} mean bits {r['mean_weight_bits']:.2f} "
              f"top-1 {r['metric']:.2f} | uniform {u.get('option', '-')} top-1 {u.get('metric', float('nan')):.2f}")


def _calibration_labels(model_name: str, num_calib: int) -> torch.Tensor:
    from hf_adaquant.data import efficientnet_lite0_transform, load_cifar10_npz, load_imagenet_tensors, shared_dir

    shared = shared_dir()
    if model_name.startswith("resnet"):
        return load_cifar10_npz(shared / "data" / "cifar10" / "calib.npz", limit=num_calib)[1]
    return load_imagenet_tensors(shared / "data" / "imagenet" / "calib1000", limit=num_calib,
                                 transform=efficientnet_lite0_transform())[1]


if __name__ == "__main__":
    main()
