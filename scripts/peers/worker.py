"""One peer PTQ run on a CIFAR ResNet, inside the peer's own virtual environment.

Imports only torch, the peer library (through ``run_<peer>.py`` beside this file) and our model definition
file, loaded by path (``hf_adaquant/models/cifar_resnet.py`` needs only torch). Prints one ``RESULT {json}`` line.

Timing: ``seconds`` covers BN folding and the peer's PTQ (range calibration, rounding optimisation, bias
correction); model loading and both evaluations are excluded, as in ``scripts/bench_core.py``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def load_model_file(path: Path):
    """Import ``cifar_resnet.py`` by path (the peer venv does not have hf_adaquant installed)."""
    spec = importlib.util.spec_from_file_location("peer_cifar_resnet", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import the model definition {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """The model's outputs on ``x``, batch by batch."""
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def top1(out: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * int((out.argmax(1) == y).sum()) / len(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--peer", required=True, choices=["aimet", "brevitas"])
    p.add_argument("--model-file", required=True, type=Path)
    p.add_argument("--depth", required=True, type=int)
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--calib", required=True, type=Path, help=".pt tensor (N, 3, 32, 32), normalised")
    p.add_argument("--test", required=True, type=Path, help=".pt dict with x, y")
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first LIMIT test images")
    p.add_argument("--weight-bits", type=int, required=True)
    p.add_argument("--act-bits", type=int, required=True)
    p.add_argument("--first-last-bits", type=int, default=8)
    p.add_argument("--iterations", type=int, required=True, help="rounding-optimisation iterations per layer")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    p.add_argument("--range-method", default=None, help="peer-specific; default: the peer module's")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eval", action="store_true", help="time the PTQ only (same-time probes)")
    p.add_argument("--scratch", type=Path, default=Path("work/peers/scratch"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    peer = importlib.import_module(f"run_{args.peer}")
    model = load_model_file(args.model_file).load_cifar_resnet(args.depth, args.checkpoint).eval()
    calib = torch.load(args.calib)
    test = torch.load(args.test)
    x_ev, y_ev = test["x"][: args.limit], test["y"][: args.limit]
    result: dict = {"peer": args.peer, "iterations": args.iterations, "calibration_samples": len(calib),
                    "eval_images": len(x_ev), "threads": torch.get_num_threads(), "torch_version": torch.__version__,
                    "peer_version": peer.version()}

    start = time.perf_counter()
    folded = peer.fold_batch_norms(model)
    fold_seconds = time.perf_counter() - start
    if not args.no_eval:  # a wrong fold shows here, before any quantization
        fp_out = logits(folded, x_ev)
        result["fp32_folded_top1"] = top1(fp_out, y_ev)
    args.scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    qmodel, info = peer.quantize(folded, calib, args)
    result["seconds"] = fold_seconds + time.perf_counter() - start
    result.update(info)
    if not args.no_eval:
        q_out = logits(qmodel, x_ev)
        result["top1"] = top1(q_out, y_ev)
        # Proof that the quantizers act at evaluation: agreement below 100 % / a non-zero logit error.
        result["agreement_with_fp32"] = top1(q_out, fp_out.argmax(1))
        result["relative_logit_mse"] = ((q_out - fp_out).pow(2).mean() / fp_out.pow(2).mean()).item()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
