#!/usr/bin/env python
"""Peers side by side: AIMET AdaRound and Brevitas learned round on the CIFAR ResNets, next to our pipeline.

Each peer runs in its own virtual environment (their torch pins differ from ours; created on first use under
``--work``, idempotent), through ``scripts/peers/worker.py``, with our scheme: per-channel asymmetric weights,
per-tensor asymmetric activations at the input of each conv/linear, first and last layer at 8 bit, BN folded.
Calibration: the same first ``--calib`` images of ``calib.npz`` that ``scripts/bench_core.py`` uses; evaluation:
the CIFAR-10 test set (``--limit`` for smoke runs). Our own numbers are read from ``core_<model>.json`` (advanced
pipeline rows), never re-run.

Rows go to ``benchmarks/results/peers.{json,md}`` (``peers_smoke`` with ``--smoke``), saved as each run finishes.

Usage:
    python scripts/bench_peers.py                                   # both peers, ResNet-20/56, W4A8 + W4A4
    python scripts/bench_peers.py --same-time                       # iterations matched to our time (extra rows)
    python scripts/bench_peers.py --smoke --models resnet20 --settings W4A4 --aimet-iterations 10 \
        --brevitas-iterations 10 --limit 500 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from peers.report import iterations_for_time, merge_row, ours_rows, parse_setting, save_rows  # noqa: E402
from peers.venvs import PEER_REQUIREMENTS, ensure_venv  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL_FILE = ROOT / "hf_adaquant" / "models" / "cifar_resnet.py"
WORKER = ROOT / "scripts" / "peers" / "worker.py"
MODELS = ("resnet20", "resnet56")
PEERS = tuple(PEER_REQUIREMENTS)
METHOD = {"aimet": "AdaRound", "brevitas": "learned round + bias correction"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", nargs="+", default=list(PEERS), choices=PEERS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--settings", nargs="+", default=["W4A8", "W4A4"], type=_setting)
    p.add_argument("--aimet-iterations", type=_positive, default=1000, help="AdaRound iterations per layer")
    p.add_argument("--brevitas-iterations", type=_positive, default=1000, help="learned-round iterations per layer")
    p.add_argument("--aimet-range", default="tf_enhanced", choices=["tf_enhanced", "tf", "percentile"],
                   help="AIMET quant scheme for weight and activation ranges (tf_enhanced: SQNR search)")
    p.add_argument("--brevitas-range", default="mse", choices=["mse", "stats"],
                   help="Brevitas range method for weights and activations (stats: min-max weights, "
                        "99.999th-percentile activations)")
    p.add_argument("--same-time", action="store_true",
                   help="instead of --*-iterations, set each peer's iterations so that its run takes about as "
                        "long as ours (from two timed probes); rows get budget 'same-time' and sit beside the "
                        "'same-iterations' rows of a plain run")
    p.add_argument("--probe-iterations", nargs=2, type=_positive, default=[20, 200], metavar=("LOW", "HIGH"),
                   help="iteration counts of the two timed probes behind --same-time (far apart: at 1 thread a "
                        "ResNet-20 iteration costs about 0.2-0.4 s over all layers, so a difference of a few tens of "
                        "iterations is lost in the run-to-run noise)")
    p.add_argument("--calib", type=_positive, default=1000, help="calibration images (first N of calib.npz)")
    p.add_argument("--batch-size", type=_positive, default=32, help="calibration batch size of the peers")
    p.add_argument("--limit", type=_positive, default=None, help="evaluate on the first N test images only")
    p.add_argument("--threads", type=_positive, default=2, help="torch threads (bench_core's default is 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "work" / "peers", help="venvs and data files")
    p.add_argument("--ours-tags", nargs="+", default=[""], metavar="TAG",
                   help="our rows come from core_<model><TAG>.json for each TAG (bench_core --tag; '' is the "
                        "canonical core_<model>.json), e.g. --ours-tags _abl_layer _abl_block _abl_block_drop")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the table (our rows re-read, the peers' rows kept); run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="write benchmarks/results/peers_smoke.{json,md} instead of peers.{json,md}")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _setting(text: str) -> str:
    try:
        parse_setting(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.upper()


def results_path(args: argparse.Namespace) -> Path:
    return RESULTS / ("peers_smoke.json" if args.smoke else "peers.json")


def git_commit() -> str:
    """HEAD (+ "-dirty" when the scripts or model file differ from it)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "scripts/bench_peers.py", "scripts/peers",
                                "hf_adaquant/models"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def prepare_data(work: Path, num_calib: int) -> tuple[Path, Path]:
    """Calibration and test tensors as .pt files for the workers (our loader, bench_core's selection)."""
    import torch

    from hf_adaquant.data import load_cifar10_npz, shared_dir

    shared = shared_dir()
    if shared is None:
        raise SystemExit("../shared is not available: the peer benchmark needs the CIFAR-10 data and checkpoints")
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    calib, test = data / f"calib{num_calib}.pt", data / "test.pt"
    if not calib.exists():
        x_cal, _ = load_cifar10_npz(shared / "data" / "cifar10" / "calib.npz", limit=num_calib)
        if len(x_cal) < num_calib:
            raise SystemExit(f"calib.npz has {len(x_cal)} images, fewer than --calib {num_calib}")
        torch.save(x_cal.contiguous(), calib)
    if not test.exists():
        x_ev, y_ev = load_cifar10_npz(shared / "data" / "cifar10" / "test.npz")
        torch.save({"x": x_ev.contiguous(), "y": y_ev}, test)
    return calib, test


def save_row(path: Path, title: str, ours: list[dict], row: dict | None) -> None:
    """Merge ``row`` into ``path`` (re-read under a lock, so concurrent runs keep each other's rows)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f".{path.stem}.lock")):
        rows = [r for r in (json.loads(path.read_text()) if path.exists() else []) if r.get("peer") != "hf_adaquant"]
        if row is not None:
            rows = merge_row(rows, row)
        save_rows(ours + rows, path, title)


def checkpoint(model: str) -> Path:
    from hf_adaquant.data import shared_dir

    depth = int(model[len("resnet"):])
    found = sorted((shared_dir() / "models" / "cifar10-resnet").glob(f"resnet{depth}-*.th"))
    if not found:
        raise SystemExit(f"no checkpoint resnet{depth}-*.th in shared/models/cifar10-resnet")
    return found[0]


def run_worker(python: Path, peer: str, model: str, setting: str, iterations: int, args: argparse.Namespace,
               calib: Path, test: Path, evaluate: bool = True) -> dict:
    """One peer run in its venv; returns the worker's RESULT dict."""
    wbits, abits = parse_setting(setting)
    cmd = [str(python), str(WORKER), "--peer", peer, "--model-file", str(MODEL_FILE),
           "--depth", model[len("resnet"):], "--checkpoint", str(checkpoint(model)), "--calib", str(calib),
           "--test", str(test), "--weight-bits", str(wbits), "--act-bits", str(abits),
           "--iterations", str(iterations), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--seed", str(args.seed), "--range-method", args.aimet_range if peer == "aimet" else args.brevitas_range,
           "--scratch", str(args.work / "scratch" / f"{peer}-{model}-{setting}")]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if not evaluate:
        cmd.append("--no-eval")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": ""}  # nothing of our venv leaks into the peer's
    print(f"[{peer}] {model} {setting} iterations={iterations}{'' if evaluate else ' (probe)'} ...", flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    log = args.work / "logs" / f"{peer}-{model}-{setting}-{iterations}{'' if evaluate else '-probe'}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)  # the peers' own progress and warnings
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{peer} {model} {setting} failed (exit {out.returncode}); full log: {log}\n"
                           + out.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def same_time_iterations(python: Path, peer: str, model: str, setting: str, target: float,
                         args: argparse.Namespace, calib: Path, test: Path) -> tuple[int, list]:
    """Probe the peer at two iteration counts and solve for the count that takes ``target`` seconds."""
    probes = []
    for n in args.probe_iterations:
        res = run_worker(python, peer, model, setting, n, args, calib, test, evaluate=False)
        probes.append((n, res["seconds"]))
        print(f"[{peer}] probe {n} iterations: {res['seconds']:.1f}s", flush=True)
    return iterations_for_time(target, probes), probes


def run_one(python: Path, peer: str, model: str, setting: str, args: argparse.Namespace, calib: Path, test: Path,
            ours: list[dict], path: Path, title: str, commit: str) -> None:
    """One (peer, model, setting) row: fixed iterations, or with --same-time the count matching our time."""
    iterations = {"aimet": args.aimet_iterations, "brevitas": args.brevitas_iterations}[peer]
    budget, extra = "same-iterations", None
    if args.same_time:
        target = next((r for r in ours if (r["model"], r["setting"]) == (model, setting)), None)
        if target is None or not target.get("seconds"):
            raise RuntimeError(f"no timed row of ours for {model} {setting} in core_{model}.json to match")
        iterations, probes = same_time_iterations(python, peer, model, setting, target["seconds"], args, calib,
                                                  test)
        budget = "same-time"
        extra = {"target_seconds": target["seconds"], "target_threads": target["threads"],
                 "probes_iterations_seconds": probes}
        print(f"[{peer}] {model} {setting}: {iterations} iterations should take about {target['seconds']:.0f}s",
              flush=True)
    load_start = os.getloadavg()[0]
    res = run_worker(python, peer, model, setting, iterations, args, calib, test)
    row = {"peer": peer, "method": METHOD[peer], "model": model, "setting": setting, "budget": budget, **res,
           "load_average_1min_start": load_start, "load_average_1min": os.getloadavg()[0], "commit": commit,
           "smoke": args.smoke, "seed": args.seed}
    if extra:
        row["same_time"] = extra
    save_row(path, title, ours, row)
    print(f"[{peer}] {model} {setting} {budget}: top1={res['top1']:.2f} (FP32 folded "
          f"{res['fp32_folded_top1']:.2f}, agreement {res['agreement_with_fp32']:.1f}%) t={res['seconds']:.1f}s "
          f"iterations={iterations}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.work = args.work.resolve()
    if os.path.exists("/tmp/BENCH_LOCK"):
        print("waiting while /tmp/BENCH_LOCK exists (another benchmark is timing)", flush=True)
        while os.path.exists("/tmp/BENCH_LOCK"):
            time.sleep(15)
    path = results_path(args)
    title = ("SMOKE TEST (not a benchmark: few iterations, test subset) — " if args.smoke else "") + \
        "Peers side by side: CIFAR-10 ResNets, same scheme, same 1000 calibration images"
    ours = ours_rows(RESULTS, args.models, args.settings, repo_root=ROOT, tags=args.ours_tags)
    save_row(path, title, ours, None)
    if args.render:
        print(f"rewrote {path.relative_to(ROOT)} and {path.with_suffix('.md').relative_to(ROOT)}")
        return
    pythons = {peer: ensure_venv(peer, args.work / f"venv-{peer}") for peer in args.peers}
    calib, test = prepare_data(args.work, args.calib)
    commit = git_commit()
    failures = []
    for model in args.models:
        for setting in args.settings:
            for peer in args.peers:
                try:
                    run_one(pythons[peer], peer, model, setting, args, calib, test, ours, path, title, commit)
                except RuntimeError as e:  # keep going: one peer's failure must not cost the other rows
                    print(f"[{peer}] {model} {setting} FAILED: {e}", file=sys.stderr, flush=True)
                    failures.append(f"{peer} {model} {setting}")
    print(f"results: {path.relative_to(ROOT)} and {path.with_suffix('.md').relative_to(ROOT)}")
    if failures:
        raise SystemExit(f"failed runs: {failures} (logs under {args.work / 'logs'})")


if __name__ == "__main__":
    main()
