#!/usr/bin/env python
"""Core-engine benchmark: FP32, naive min-max, light and advanced pipelines on the offline models.

Each (method, bit setting) runs in its own subprocess so that its peak RSS is its own. Results go to
``benchmarks/results/core_<model>.json`` and ``core_<model>.md``.

Usage:
    python scripts/bench_core.py --model resnet20 [--settings W8A8 W4A8 W4A4 W2A4] [--methods naive light advanced]
    python scripts/bench_core.py --model efficientnet_lite0 --settings W4A8 W4A4
    python scripts/bench_core.py --model resnet50_rss      # peak RSS of the advanced pipeline, random weights
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from filelock import FileLock

from hf_adaquant import AdaQuantConfig, quantize
from hf_adaquant.data import efficientnet_lite0_transform, load_cifar10_npz, load_imagenet_tensors, shared_dir
from hf_adaquant.evaluation import evaluate_classifier
from hf_adaquant.size import model_size
from hf_adaquant.utils.profiling import profiling

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
METHODS = {
    "naive": dict(pipeline="light", bn_tuning=False, bias_correction=False, weight_range_method="minmax",
                  activation_range_method="minmax"),
    "light": dict(pipeline="light"),
    "advanced": dict(pipeline="advanced"),
    # The paper's unconstrained W' overfits at 2-bit weights; this keeps |W' - W| within one weight step.
    "advanced_limit1": dict(pipeline="advanced", weight_deviation_limit=1.0),
}


def parse_setting(setting: str) -> tuple[int, int]:
    w, a = setting.upper().lstrip("W").split("A")
    return int(w), int(a)


def load(model_name: str, num_calib: int):
    """(model, calibration batches, eval x, eval y) for a benchmark model."""
    shared = shared_dir()
    if shared is None:
        sys.exit("../shared is not available: the benchmarks need the offline models and data")
    if model_name in ("resnet20", "resnet56"):
        from hf_adaquant.models import load_cifar_resnet

        depth = int(model_name[6:])
        ckpt = next((shared / "models" / "cifar10-resnet").glob(f"resnet{depth}-*.th"))
        model = load_cifar_resnet(depth, ckpt)
        x_cal, _ = load_cifar10_npz(shared / "data" / "cifar10" / "calib.npz", limit=num_calib)
        x_ev, y_ev = load_cifar10_npz(shared / "data" / "cifar10" / "test.npz")
        return model, [x_cal[i : i + 100] for i in range(0, len(x_cal), 100)], x_ev, y_ev
    if model_name == "efficientnet_lite0":
        from hf_adaquant.models import load_efficientnet_lite0

        tf = efficientnet_lite0_transform()
        x_cal, _ = load_imagenet_tensors(shared / "data" / "imagenet" / "calib1000", limit=num_calib, transform=tf)
        x_ev, y_ev = load_imagenet_tensors(shared / "data" / "imagenet" / "val1300", transform=tf)
        return load_efficientnet_lite0(), [x_cal[i : i + 50] for i in range(0, len(x_cal), 50)], x_ev, y_ev
    if model_name == "resnet50_rss":
        import timm

        model = timm.create_model("resnet50", pretrained=False).eval()
        g = torch.Generator().manual_seed(0)
        x_cal = torch.randn(num_calib, 3, 224, 224, generator=g)
        return model, [x_cal[i : i + 50] for i in range(0, len(x_cal), 50)], None, None
    raise SystemExit(f"unknown model {model_name!r}")


class StageRss:
    """Peak resident memory per pipeline stage: a thread samples /proc/self/statm every ``interval`` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.samples: list[tuple[float, int]] = []
        self._interval = interval
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with open("/proc/self/statm") as f:
                self.samples.append((time.perf_counter(), int(f.read().split()[1]) * self._page))
            self._stop.wait(self._interval)

    def __enter__(self) -> "StageRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def by_stage(self, start: float, stage_seconds: dict[str, float]) -> dict[str, float]:
        """Peak MiB of the samples inside each stage (stages run back to back in ``stage_seconds`` order)."""
        peaks, begin = {}, start
        for stage, seconds in stage_seconds.items():
            inside = [rss for t, rss in self.samples if begin <= t <= begin + seconds]
            if inside:
                peaks[stage] = round(max(inside) / 2**20)
            begin += seconds
        return peaks


def run_single(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, calib, x_ev, y_ev = load(args.model, args.calib)
    result: dict = {"model": args.model, "method": args.method, "setting": args.setting,
                    "calibration_samples": sum(len(b) for b in calib), "threads": args.threads}
    if args.method == "fp32":
        result["top1"] = evaluate_classifier(model, x_ev, y_ev)
        result["seconds"] = 0.0
    else:
        wbits, abits = parse_setting(args.setting)
        overrides = json.loads(args.config) if args.config else {}
        config = AdaQuantConfig(weight_bits=wbits, activation_bits=abits, seed=args.seed,
                                **{"progress": False, **METHODS[args.method], **overrides})
        with StageRss() as rss, profiling() as profile:
            start = time.perf_counter()
            qmodel = quantize(model, calib, config)
            result["seconds"] = time.perf_counter() - start
        # where the time goes against its FLOP bound at this machine's measured throughput (issue #14)
        print(profile.format_table(), file=sys.stderr)
        result["profile"] = qmodel.hf_adaquant_report.profile
        result["stage_seconds"] = qmodel.hf_adaquant_report.stage_seconds
        result["stage_peak_rss_mib"] = rss.by_stage(start, result["stage_seconds"])
        result["config"] = config.to_dict()
        size = model_size(qmodel)
        result["size_ratio"] = size.ratio
        if x_ev is not None:
            result["top1"] = evaluate_classifier(qmodel, x_ev, y_ev)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _git_commit() -> str:
    """HEAD of this checkout (+ "-dirty" with uncommitted library changes), so every row can be reproduced."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "hf_adaquant"], cwd=root, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def merge_row(rows: list[dict], row: dict) -> list[dict]:
    """``rows`` with ``row`` replacing any earlier row of the same (method, setting)."""
    return [r for r in rows if (r["method"], r["setting"]) != (row["method"], row["setting"])] + [row]


def save_row(name: str, row: dict) -> None:
    """Merge ``row`` into ``core_<name>.json`` (settings can be (re)run one group at a time).

    The file is re-read under a lock at write time: two runs with the same tag used to each keep the rows they
    read at start, and the later one dropped the other's row.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    with FileLock(RESULTS / f".core_{name}.lock"):
        path = RESULTS / f"core_{name}.json"
        rows = json.loads(path.read_text()) if path.exists() else []
        write_tables(name, merge_row(rows, row))


def write_tables(model: str, rows: list[dict]) -> None:
    for r in rows:  # evaluate's format (accuracy as a fraction) next to the historical top1 (percent)
        if "top1" in r:
            r["metrics"] = {"accuracy": round(r["top1"] / 100, 6)}
    tmp = RESULTS / f"core_{model}.json.tmp"  # atomic: an interrupted write never leaves a truncated file
    tmp.write_text(json.dumps(rows, indent=2))
    tmp.replace(RESULTS / f"core_{model}.json")
    lines = [f"| {model} | setting | top-1 | calibration s | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in rows:
        top1 = f"{r['top1']:.2f}" if "top1" in r else "—"
        lines.append(f"| {r['method']} | {r['setting']} | {top1} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    (RESULTS / f"core_{model}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=["resnet20", "resnet56", "efficientnet_lite0", "resnet50_rss"])
    parser.add_argument("--settings", nargs="+", default=["W8A8", "W4A8", "W4A4", "W2A4"])
    parser.add_argument("--methods", nargs="+", default=["naive", "light", "advanced"], choices=list(METHODS))
    parser.add_argument("--tag", default="", help="suffix of the results files (core_<model><tag>.json)")
    parser.add_argument("--calib", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="", help="JSON dict of AdaQuantConfig overrides for every run")
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return
    runs = ([("fp32", "FP32")] if args.model != "resnet50_rss" and not args.tag else [])
    runs += [(m, s) for s in args.settings for m in args.methods]
    for method, setting in runs:
        cmd = [sys.executable, __file__, "--single", "--model", args.model, "--method", method, "--setting",
               setting, "--calib", str(args.calib), "--threads", str(args.threads), "--seed", str(args.seed),
               "--config", args.config]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{method} {setting} failed")
        row = json.loads(line[len("RESULT "):])
        row["load_average_1min"] = os.getloadavg()[0]  # timings are only comparable on an idle machine
        row["commit"] = _git_commit()
        print(f"{args.model:18s} {method:9s} {setting:5s} top1={row.get('top1', float('nan')):.2f} "
              f"t={row['seconds']:.1f}s rss={row['peak_rss_mib']:.0f}MiB", flush=True)
        print("ROW " + json.dumps(row), flush=True)  # the whole row in the log too
        save_row(args.model + args.tag, row)


if __name__ == "__main__":
    main()
