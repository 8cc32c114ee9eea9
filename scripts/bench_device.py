#!/usr/bin/env python
"""EfficientNet-Lite0 core benchmark on a GPU, in two phases that need only one image folder each.

Why two phases: the lent GPU machine of our workplace takes at most 64 MiB of uploaded files per call, and
calib1000 (31 MB) + val1300 (39 MB) + the weights (19 MB) do not fit together. Phase ``quantize`` needs the
calibration images and writes every quantized model (a pickled module) to ``--save-dir``; phase ``evaluate`` needs
only the evaluation images, scores every saved model and merges the rows into
``benchmarks/results/core_efficientnet_lite0<tag>.json`` / ``.md`` (same row format as ``bench_core.py``).

Usage (``$HF_ADAQUANT_SHARED`` points at a folder laid out like ``../shared``):
    python scripts/bench_device.py quantize --runs advanced:W4A8 light:W4A4 --save-dir qmodels --budget-s 420
    python scripts/bench_device.py evaluate --save-dir qmodels --tag _gpu
A run is ``method:setting``, or ``method:setting:name`` with that name's config overrides given by ``--extra``,
e.g. ``advanced:W4A8:seq`` with ``--extra seq='{"variant":"sequential"}'``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch

# sibling scripts: `python scripts/bench_device.py` puts scripts/ first on sys.path (no edit of it needed)
from bench_core import METHODS, _git_commit, parse_setting, save_row

from hf_adaquant import AdaQuantConfig, quantize
from hf_adaquant.data import efficientnet_lite0_transform, load_imagenet_tensors, shared_dir
from hf_adaquant.evaluation import evaluate_classifier
from hf_adaquant.models import load_efficientnet_lite0
from hf_adaquant.size import model_size


def _imagenet(split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    shared = shared_dir()
    folder = None if shared is None else shared / "data" / "imagenet" / split
    if folder is None or not folder.is_dir():
        sys.exit(f"ImageNet folder {split!r} not found under the shared dir (set $HF_ADAQUANT_SHARED)")
    return load_imagenet_tensors(folder, limit=limit, transform=efficientnet_lite0_transform(), num_workers=8)


def quantize_phase(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    extras = {k: json.loads(v) for k, v in (e.split("=", 1) for e in args.extra)}
    x_cal, _ = _imagenet("calib1000", args.calib)
    calib = [x_cal[i : i + 50] for i in range(0, len(x_cal), 50)]
    model = load_efficientnet_lite0().to(device)
    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for run in args.runs:
        method, setting, *name = run.split(":")
        if time.perf_counter() - started > args.budget_s:
            print(f"SKIP {run}: time budget of {args.budget_s} s spent", flush=True)
            continue
        overrides = extras.get(name[0], {}) if name else {}
        wbits, abits = parse_setting(setting)
        config = AdaQuantConfig(weight_bits=wbits, activation_bits=abits, seed=args.seed, progress=False,
                                **{**METHODS[method], **overrides})
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            qmodel = quantize(model, calib, config)
        except Exception:  # report and go on: one broken setting must not cost the others' device time
            traceback.print_exc()
            print(f"FAILED {run}", flush=True)
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        row = {"model": "efficientnet_lite0", "method": method + (f"_{name[0]}" if name else ""),
               "setting": setting, "calibration_samples": len(x_cal), "seconds": seconds,
               "stage_seconds": qmodel.hf_adaquant_report.stage_seconds, "config": config.to_dict(),
               "size_ratio": model_size(qmodel).ratio, "device": torch.cuda.get_device_name(device)
               if device.type == "cuda" else "cpu", "commit": _git_commit(),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        torch.save({"row": row, "model": qmodel}, save_dir / f"{row['method']}_{setting}.pt")
        print(f"QUANTIZED {row['method']:14s} {setting} {seconds:.1f}s {row['stage_seconds']}", flush=True)


def evaluate_phase(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    x_ev, y_ev = _imagenet("val1300")
    for path in sorted(Path(args.save_dir).glob("*.pt")):
        saved = torch.load(path, map_location=device, weights_only=False)
        row = saved["row"]
        row["top1"] = evaluate_classifier(saved["model"].to(device), x_ev, y_ev, batch_size=250)
        print(f"RESULT {row['method']:14s} {row['setting']} top1={row['top1']:.2f} t={row['seconds']:.1f}s",
              flush=True)
        save_row(f"efficientnet_lite0{args.tag}", row)  # each row as soon as it is measured, merged under a lock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["quantize", "evaluate"])
    parser.add_argument("--runs", nargs="+", default=["advanced:W4A8"])
    parser.add_argument("--extra", nargs="*", default=[], help="name=JSON config overrides for runs named :name")
    parser.add_argument("--save-dir", default="qmodels")
    parser.add_argument("--tag", default="_gpu")
    parser.add_argument("--calib", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new run after this many seconds (the rest are skipped)")
    args = parser.parse_args()
    quantize_phase(args) if args.phase == "quantize" else evaluate_phase(args)


if __name__ == "__main__":
    main()
