#!/usr/bin/env python
"""ONNX benchmark (issue #13): onnxruntime on the exported files against the PyTorch quantized models.

``--agreement``: quantize (as ``bench_core.py`` / ``bench_squad.py`` do), save the checkpoint under ``--work-dir``,
export it, then evaluate the PyTorch quantized model and onnxruntime on the full evaluation set:
EfficientNet-Lite0 W8A8/W4A8 (light, 1000 calibration images): top-1 of both and top-1 agreement on val1300;
CIFAR ResNet-20 W4A4 (advanced): test accuracy of both on the 10k test set; MiniLM-SQuAD W8A8/W4A8 (light,
256 features): EM/F1 of both on articles 40-47. → ``benchmarks/results/onnx_agreement.{json,md}``.

``--latency``: for resnet50 (timm, random weights: no weights offline), EfficientNet-Lite0 and MiniLM-SQuAD at
FP32, W8A8 and W4A8 (+ onnxruntime's own static int8 QDQ quantization of the FP32 resnet50 as the reference):
ONNX file size; onnxruntime latency at batch 1 and 8 (graph optimisations on; warm-up, then the median of
``--runs``) and the peak RSS of that inference process, each in a fresh process (``scripts/ort_worker.py``,
no torch imported); the PyTorch model's latency beside them (fake-quant for W8A8/W4A8), also in a fresh process.
Quantized checkpoints come from ``--agreement``'s work folder when there; otherwise (and always for resnet50) the
model is quantized naively on a few calibration samples, which does not change speed (the table says which).
→ ``benchmarks/results/onnx_latency.{json,md}``.

Every row records the commit, the load average and the thread count. Time the latency part on an idle machine.

Usage:
    OMP_NUM_THREADS=1 python scripts/bench_onnx.py --agreement --threads 1          # all models (hours on 1 thread)
    python scripts/bench_onnx.py --agreement --models resnet20 --limit 200         # quick look: _limit200 files
    python scripts/bench_onnx.py --latency --threads 2 [--runs 50] [--models resnet50 minilm_squad]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from filelock import FileLock
from torch import nn


# sibling scripts: `python scripts/bench_onnx.py` puts scripts/ first on sys.path (no edit of it needed)
import bench_core
import bench_squad
import ort_worker

from hf_adaquant import AdaQuantConfig, export_onnx, load_quantized, quantize, save_quantized
from hf_adaquant.data import load_cifar10_npz, shared_dir
from hf_adaquant.export.tracing import eager_attention
from hf_adaquant.metrics import load_metric
from hf_adaquant.tasks.squad import (CALIBRATION_ARTICLES, EVAL_ARTICLES, bert_qa_quantization_config,
                                     load_squad_examples, predict_squad, squad_calibration_batches,
                                     squad_references)
from hf_adaquant.utils.batches import slice_batch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORKER = Path(__file__).resolve().parent / "ort_worker.py"
# model: (settings, method, calibration samples); methods as bench_core.py / bench_squad.py run them
AGREEMENT = {"resnet20": (["W4A4"], "advanced", 1000), "minilm_squad": (["W8A8", "W4A8"], "light", 256),
             "efficientnet_lite0": (["W8A8", "W4A8"], "light", 1000)}  # quickest first
TARGETS = {"efficientnet_lite0": "top-1 agreement >= 99.5 %", "resnet20": "accuracy within +-0.05",
           "minilm_squad": "F1 within 0.1"}


def target_met(row: dict) -> bool:
    """The issue's bar for this model: top-1 agreement (EfficientNet), metric difference (the others)."""
    if row["model"] == "efficientnet_lite0":
        return row["agreement"] >= 99.5
    return abs(row["onnxruntime"] - row["pytorch"]) <= (0.05 if row["model"] == "resnet20" else 0.1) + 1e-9
LATENCY_MODELS = ("resnet50", "efficientnet_lite0", "minilm_squad")
IMAGE_SIZE = {"resnet50": 224, "efficientnet_lite0": 224, "resnet20": 32}
SYMMETRIC = "-sym"  # setting suffix: weight_symmetric=True
RESIDUAL = "-res"  # setting suffix: residual_output_bits=8 (after -sym when both: "W8A8-sym-res")
QUICK_CALIBRATION = 32  # samples, naive ranges: checkpoints made only to be timed


# ------------------------------------------------------------------------------------------------ rows, files
def save_row(stem: str, row: dict, keys: tuple[str, ...], render: Any) -> None:
    """Merge ``row`` into ``<stem>.json`` (replacing the row with the same ``keys``) under a lock, re-read at write
    time (several runs may share the file), and rewrite ``<stem>.md`` with ``render``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with FileLock(RESULTS / f".{stem}.lock"):
        path = RESULTS / f"{stem}.json"
        rows = json.loads(path.read_text()) if path.exists() else []
        rows = [r for r in rows if tuple(r.get(k) for k in keys) != tuple(row[k] for k in keys)] + [row]
        for target, text in ((path, json.dumps(rows, indent=2) + "\n"), (path.with_suffix(".md"), render(rows))):
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(text)
            tmp.replace(target)


def stamp(row: dict, threads: int) -> dict:
    row.update(commit=bench_core._git_commit(), load_average_1min=os.getloadavg()[0], threads=threads,
               torch_version=torch.__version__, onnxruntime_version=ort.__version__)
    return row


def session(path: Path, threads: int, optimization: str = "all") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimization == "all"
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def need_shared() -> Path:
    shared = shared_dir()
    if shared is None:
        raise SystemExit("../shared is not available: the benchmark needs the offline models and data")
    return shared


# ------------------------------------------------------------------------------------------------------- data
def image_benchmark(name: str, num_calib: int, limit: int | None) -> tuple[nn.Module, list, torch.Tensor, torch.Tensor]:
    """bench_core's model, calibration batches and evaluation set (``limit``: that many of each)."""
    model, calib, x, y = bench_core.load(name, num_calib if limit is None else min(num_calib, limit))
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return model, calib, x, y


def squad_benchmark(num_calib: int, limit: int | None, seed: int) -> tuple[nn.Module, Any, list, list]:
    """bench_squad's model, tokenizer, calibration batches and evaluation examples (articles 40-47)."""
    import transformers

    shared = need_shared()
    model_dir = shared / "models" / "minilm-squad"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=torch.float32).eval()
    squad = shared / "data" / "squad" / "dev-v1.1.json.gz"
    examples = load_squad_examples(squad, articles=list(EVAL_ARTICLES))
    calib = squad_calibration_batches(load_squad_examples(squad, articles=CALIBRATION_ARTICLES), tokenizer,
                                      num_calib if limit is None else min(num_calib, limit), 32, max_length=192,
                                      stride=64, seed=seed)
    return model, tokenizer, calib, examples if limit is None else examples[:limit]


def setting_options(setting: str) -> tuple[str, dict[str, Any]]:
    """A setting's bits (``"W8A8"``) and the config options its suffixes ask for: ``-sym`` symmetric weights (zero-point
    0, the form onnxruntime's int8 kernels take at 8 bits), ``-res`` 8-bit outputs on the layers before residual adds
    (so onnxruntime runs those convolutions as QLinearConv too)."""
    options: dict[str, Any] = {"weight_symmetric": False}
    if setting.endswith(RESIDUAL):
        setting, options["residual_output_bits"] = setting.removesuffix(RESIDUAL), 8
    if setting.endswith(SYMMETRIC):
        setting, options["weight_symmetric"] = setting.removesuffix(SYMMETRIC), True
    return setting, options


def config_for(name: str, setting: str, method: str, seed: int) -> AdaQuantConfig:
    """bench_core's methods; for MiniLM the BERT QA policy with bench_squad's presets (naive: min-max ranges)."""
    bits, options = setting_options(setting)
    wbits, abits = bench_core.parse_setting(bits)
    if name == "minilm_squad":
        if method == "naive":
            pipeline, extra = "light", {k: v for k, v in bench_core.METHODS["naive"].items() if k != "pipeline"}
        else:
            pipeline, extra = method, dict(bench_squad.PIPELINE_PRESETS[method])
        return bert_qa_quantization_config(wbits, abits, pipeline=pipeline, seed=seed, progress=False,
                                           **options, **extra)
    return AdaQuantConfig(weight_bits=wbits, activation_bits=abits, seed=seed, progress=False, **options,
                          **bench_core.METHODS[method])


def quantize_to(work: Path, name: str, setting: str, method: str, model: nn.Module, calib: list, seed: int,
                tokenizer: Any = None) -> tuple[nn.Module, Path, dict]:
    """Quantize, save the checkpoint as ``work/<name>_<setting>/`` and its description beside it."""
    start = time.perf_counter()
    config = config_for(name, setting, method, seed)
    qmodel = quantize(model, calib, config)
    directory = save_quantized(qmodel, work / f"{name}_{setting}")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    meta = {"method": method, "calibration_samples": sum(len(b) if isinstance(b, torch.Tensor) else
                                                         len(b["input_ids"]) for b in calib),
            "quantize_seconds": time.perf_counter() - start, "commit": bench_core._git_commit(),
            "embedding_bits": config.embedding_bits}
    (work / f"{name}_{setting}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return qmodel, directory, meta


# -------------------------------------------------------------------------------------------------- agreement
def _batched_logits(run: Any, x: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])


@torch.no_grad()
def classifier_agreement(qmodel: nn.Module, sess: ort.InferenceSession, x: torch.Tensor, y: torch.Tensor,
                         batch: int = 50) -> dict:
    """Top-1 of PyTorch and onnxruntime and how often they agree, and the noise floor: the same PyTorch model on
    channels-last inputs (other convolution kernels: only the float summation order differs)."""
    name = sess.get_inputs()[0].name
    ref = _batched_logits(lambda b: qmodel(b).numpy(), x, batch)
    got = _batched_logits(lambda b: sess.run(None, {name: b.numpy()})[0], x, batch)
    qmodel.to(memory_format=torch.channels_last)
    try:
        other = _batched_logits(lambda b: qmodel(b.contiguous(memory_format=torch.channels_last)).numpy(), x, batch)
    finally:
        qmodel.to(memory_format=torch.contiguous_format)
    labels = y.numpy()
    return {"metric": "top-1 %", "pytorch": 100 * float((ref.argmax(1) == labels).mean()),
            "onnxruntime": 100 * float((got.argmax(1) == labels).mean()),
            "agreement": 100 * float((ref.argmax(1) == got.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(ref - got).max()), "max_abs_logit": float(np.abs(ref).max()),
            "pytorch_channels_last": 100 * float((other.argmax(1) == labels).mean()),
            "pytorch_channels_last_agreement": 100 * float((ref.argmax(1) == other.argmax(1)).mean()),
            "pytorch_channels_last_max_abs_logit_diff": float(np.abs(ref - other).max()),
            "samples": len(labels)}


class OrtQuestionAnswering(nn.Module):
    """An onnxruntime session behind ``BertForQuestionAnswering``'s call (for the SQuAD evaluation code)."""

    def __init__(self, sess: ort.InferenceSession) -> None:
        super().__init__()
        self.sess = sess
        self.names = [i.name for i in sess.get_inputs()]

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        start, end = self.sess.run(None, {k: inputs[k].numpy() for k in self.names})[:2]
        return {"start_logits": torch.from_numpy(start), "end_logits": torch.from_numpy(end)}


def _same_answers(a: list[dict], b: list[dict]) -> float:
    return 100 * float(np.mean([x["prediction_text"] == y["prediction_text"] for x, y in zip(a, b)]))


@torch.no_grad()
def squad_agreement(qmodel: nn.Module, sess: ort.InferenceSession, tokenizer: Any, examples: list) -> dict:
    """F1/EM of PyTorch and onnxruntime, and the noise floor: the same PyTorch model with its attention computed
    by another kernel (SDPA's math backend: only the float summation order differs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    metric, references = load_metric("squad"), squad_references(examples)
    row: dict = {"metric": "F1 (EM)", "samples": len(examples)}
    answers = {}
    runs = (("pytorch", qmodel, None), ("onnxruntime", OrtQuestionAnswering(sess), None),
            ("pytorch_math_attention", qmodel, SDPBackend.MATH))
    for key, model, backend in runs:
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            answers[key] = predict_squad(model, tokenizer, examples, batch_size=32, max_length=384, stride=128,
                                         progress=False)
        scores = metric.compute(predictions=answers[key], references=references)
        row[key], row[f"{key}_exact_match"] = float(scores["f1"]), float(scores["exact_match"])
    row["agreement"] = _same_answers(answers["pytorch"], answers["onnxruntime"])  # identical answer text
    row["pytorch_math_attention_agreement"] = _same_answers(answers["pytorch"], answers["pytorch_math_attention"])
    return row


def render_agreement(rows: list[dict]) -> str:
    lines = ["# onnxruntime vs PyTorch on the quantized models (issue #13)", "",
             "Same quantized model, evaluated in PyTorch (fake quantization) and by onnxruntime on its exported "
             "file (graph optimisations as in the row); agreement: same top-1 class / same answer text.", "",
             "| model | setting | method | eval samples | metric | PyTorch | onnxruntime | difference | agreement % "
             "| target | commit |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = ""
        if "pytorch_exact_match" in r:
            extra = f" ({r['pytorch_exact_match']:.2f} / {r['onnxruntime_exact_match']:.2f} EM)"
        if "pytorch_channels_last" in r:  # the noise floor: PyTorch against itself with other conv kernels
            extra += (f"; PyTorch, channels-last: {r['pytorch_channels_last'] - r['pytorch']:+.2f}, "
                      f"{r['pytorch_channels_last_agreement']:.2f} % agreement")
        if "pytorch_math_attention" in r:  # the noise floor: PyTorch against itself with another attention kernel
            extra += (f"; PyTorch, math attention: {r['pytorch_math_attention'] - r['pytorch']:+.2f} F1, "
                      f"{r['pytorch_math_attention_agreement']:.2f} % same answers")
        lines.append(f"| {r['model']} | {r['setting']} | {r['method']} | {r['samples']} | {r['metric']} | "
                     f"{r['pytorch']:.2f} | {r['onnxruntime']:.2f} | {r['onnxruntime'] - r['pytorch']:+.2f}{extra} | "
                     f"{r['agreement']:.2f} | {r['target']} ({'met' if target_met(r) else 'MISSED'}) | {r['commit']} |")
    return "\n".join(lines) + "\n"


def run_agreement(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tag = args.tag if args.tag is not None else (f"_limit{args.limit}" if args.limit else "")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        if name not in AGREEMENT:
            raise SystemExit(f"--agreement knows {sorted(AGREEMENT)}, got {name!r}")
        settings, method, num_calib = AGREEMENT[name]
        method = args.method or method
        tokenizer = None
        if name == "minilm_squad":
            model, tokenizer, calib, examples = squad_benchmark(num_calib, args.limit, args.seed)
        else:
            model, calib, x, y = image_benchmark(name, num_calib, args.limit)
        for setting in args.settings or settings:
            qmodel, directory, meta = quantize_to(args.work_dir, name, setting, method, model, calib, args.seed,
                                                  tokenizer)
            example = slice_batch(calib[0], 0, 2)
            path = export_onnx(qmodel, directory / "model.onnx", example, op_style=args.op_style)
            sess = session(path, args.threads, args.ort_optimization)
            start = time.perf_counter()
            if name == "minilm_squad":
                row = squad_agreement(qmodel, sess, tokenizer, examples)
            else:
                row = classifier_agreement(qmodel, sess, x, y)
            row.update(model=name, setting=setting, method=method, target=TARGETS[name],
                       calibration_samples=meta["calibration_samples"], quantize_seconds=meta["quantize_seconds"],
                       eval_seconds=time.perf_counter() - start, ort_optimization=args.ort_optimization,
                       op_style=args.op_style,
                       onnx_bytes=path.stat().st_size, checkpoint=str(directory),
                       embedding_bits=meta["embedding_bits"],
                       peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            stamp(row, args.threads)
            print(f"{name:18s} {setting} {method}: PyTorch {row['pytorch']:.2f} onnxruntime {row['onnxruntime']:.2f} "
                  f"agreement {row['agreement']:.2f}%", flush=True)
            print("ROW " + json.dumps(row), flush=True)
            save_row(f"onnx_agreement{tag}", row, ("model", "setting"), render_agreement)


# ---------------------------------------------------------------------------------------------------- latency
def float_model(name: str) -> tuple[nn.Module, Any]:
    """The FP32 model and a batch-2 example input."""
    if name == "resnet50":
        import timm

        torch.manual_seed(0)
        return timm.create_model("resnet50", pretrained=False).eval(), torch.randn(2, 3, 224, 224)
    if name == "efficientnet_lite0":
        from hf_adaquant.models import load_efficientnet_lite0

        return load_efficientnet_lite0(), torch.randn(2, 3, 224, 224)
    if name == "resnet20":
        from hf_adaquant.models import cifar_resnet20, load_cifar_resnet

        shared = shared_dir()
        checkpoints = sorted((shared / "models" / "cifar10-resnet").glob("resnet20-*.th")) if shared else []
        model = load_cifar_resnet(20, checkpoints[0]) if checkpoints else cifar_resnet20().eval()
        return model, torch.randn(2, 3, 32, 32)
    if name == "minilm_squad":
        import transformers

        model_dir = need_shared() / "models" / "minilm-squad"
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=torch.float32).eval()
        ids = torch.randint(1000, 20000, (2, 64))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "token_type_ids": torch.zeros_like(ids)}
    raise SystemExit(f"unknown model {name!r}")


def export_float(model: nn.Module, example: Any, path: Path) -> Path:
    """The FP32 model as ONNX (torch.onnx, dynamo; dynamic batch, and sequence for token inputs)."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if isinstance(example, dict):
        args, kwargs, shapes = (), example, {k: {0: batch, 1: sequence} for k in example}
    else:
        args, kwargs, shapes = (example,), None, ({0: batch},)
    # the attention as export_onnx exports it (eager: no IsNaN/Where guards), so FP32 is timed at its best too
    with torch.no_grad(), eager_attention(model):
        program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                                    opset_version=18, external_data=False, verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


# onnxruntime's own static int8 QDQ quantization, by activation type: its default (int8 activations, "S8S8") and
# uint8 activations ("U8S8"), which its documentation recommends on x86-64 and which its fast kernels take
ORT_REFERENCES = {"onnxruntime int8 QDQ (U8S8)": "QUInt8", "onnxruntime int8 QDQ (S8S8, its default)": "QInt8"}


def ort_int8_reference(fp32_path: Path, out: Path, example: torch.Tensor, activation_type: str = "QUInt8",
                       samples: int = 16) -> Path:
    """onnxruntime's own static int8 QDQ quantization (after its pre-processing) of an FP32 image model,
    calibrated on ``samples`` random images (min-max, per-tensor int8 weights; activations of
    ``activation_type``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32_path), str(pre))
    name = session(pre, 1).get_inputs()[0].name
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(1, *example.shape[1:], generator=g).numpy() for _ in range(samples)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(images)

        def get_next(self) -> dict | None:
            item = next(self.items, None)
            return None if item is None else {name: item}

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=getattr(QuantType, activation_type), weight_type=QuantType.QInt8)
    return out


def calibration_images(name: str, count: int) -> list[torch.Tensor]:
    """``count`` calibration images of a benchmark model (without loading its evaluation set)."""
    from hf_adaquant.data import efficientnet_lite0_transform, load_imagenet_tensors

    shared = need_shared()
    if name == "efficientnet_lite0":
        x, _ = load_imagenet_tensors(shared / "data" / "imagenet" / "calib1000", limit=count,
                                     transform=efficientnet_lite0_transform())
    else:
        x, _ = load_cifar10_npz(shared / "data" / "cifar10" / "calib.npz", limit=count)
    return [x]


def reload(name: str, directory: str | Path) -> nn.Module:
    """A saved checkpoint back (plain PyTorch models need their float skeleton)."""
    return load_quantized(directory, model=float_model(name)[0] if name == "resnet20" else None)


def latency_checkpoint(args: argparse.Namespace, name: str, setting: str, model: nn.Module) -> tuple[Path, str]:
    """The agreement run's checkpoint when there (not for resnet50), else a naive one made here."""
    directory = args.work_dir / f"{name}_{setting}"
    meta_path = args.work_dir / f"{name}_{setting}.json"
    if (directory / "config.json").is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return directory, f"{meta['method']}, {meta['calibration_samples']} calibration samples"
    if name == "resnet50":
        g = torch.Generator().manual_seed(0)
        calib = [torch.randn(QUICK_CALIBRATION // 2, 3, 224, 224, generator=g) for _ in range(2)]
        label = f"naive, {QUICK_CALIBRATION} random-noise images (random weights)"
    elif name == "minilm_squad":
        _, _, calib, _ = squad_benchmark(QUICK_CALIBRATION, None, args.seed)
        label = f"naive, {QUICK_CALIBRATION} SQuAD features (latency only)"
    else:
        calib = calibration_images(name, QUICK_CALIBRATION)
        label = f"naive, {QUICK_CALIBRATION} calibration images (latency only)"
    tokenizer = None
    if name == "minilm_squad":
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(need_shared() / "models" / "minilm-squad")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    quantize_to(args.work_dir, name, setting, "naive", model, calib, args.seed, tokenizer)
    return directory, label


def _worker_result(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def measure(args: argparse.Namespace, engine: str, source: str, name: str, batch: int) -> dict:
    """One latency measurement in a fresh process: onnxruntime on a file, or PyTorch on a model."""
    common = ["--batch", str(batch), "--threads", str(args.threads), "--seq-len", str(args.seq_len),
              "--warmup", str(args.warmup), "--runs", str(args.runs)]
    if engine == "ort":
        return _worker_result([sys.executable, str(WORKER), source, *common])
    return _worker_result([sys.executable, __file__, "--torch-worker", "--models", name, "--source", source,
                           *common])


def torch_inputs(name: str, batch: int, seq_len: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    if name == "minilm_squad":  # as ort_worker.make_inputs
        ids = torch.randint(1000, 20000, (batch, seq_len), generator=g)
        types = torch.zeros_like(ids)
        types[:, seq_len // 3:] = 1
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": types}
    return torch.randn(batch, 3, IMAGE_SIZE[name], IMAGE_SIZE[name], generator=g)


@torch.no_grad()
def torch_worker(args: argparse.Namespace) -> None:
    """``--torch-worker``: time the FP32 model (``--source fp32``) or a reloaded checkpoint folder."""
    torch.set_num_threads(args.threads)
    name = args.models[0]
    model = float_model(name)[0] if args.source == "fp32" else reload(name, args.source)
    inputs = torch_inputs(name, args.batch, args.seq_len, args.seed)

    def call() -> Any:
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    for _ in range(args.warmup):
        call()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    print("RESULT " + json.dumps({"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
                                  "peak_rss_mib": ort_worker.peak_rss_mib()}),
          flush=True)


def render_latency(rows: list[dict]) -> str:
    lines = ["# onnxruntime latency, file size and memory (issue #13)", "",
             "CPU, onnxruntime with graph optimisations on, intra-op threads as in the row; median of the timed "
             "runs after warm-up, each measurement in a fresh process (its peak RSS). PyTorch: the same model in "
             "PyTorch (fake quantization for W8A8/W4A8). Speed-up: FP32 onnxruntime latency / this row's. "
             "Timings are only comparable at a low load average.", "",
             "| model | variant | quantized by | ONNX MiB | vs FP32 file | ORT b1 ms | ORT b8 ms | speed-up b1 | "
             "speed-up b8 | ORT RSS b1 / b8 MiB | PyTorch b1 ms | PyTorch b8 ms | PyTorch RSS b8 MiB | threads | "
             "load avg | commit |", "|" + "---|" * 16]
    for r in rows:
        def ms(key: str) -> str:  # a value, or a dash where the row has none (the reference has no PyTorch model)
            return f"{r[key]:.1f}" if r.get(key) is not None else "—"
        variant = r["variant"] + (f" ({r['op_style']})" if r.get("op_style") else "")
        lines.append(
            f"| {r['model']} | {variant} | {r['quantized_by']} | {r['onnx_bytes'] / 2**20:.1f} | "
            f"{r['file_ratio']:.3f} | {ms('ort_b1_ms')} | {ms('ort_b8_ms')} | {r['speedup_b1']:.2f}× | "
            f"{r['speedup_b8']:.2f}× | {r['ort_b1_rss_mib']:.0f} / {r['ort_b8_rss_mib']:.0f} | {ms('torch_b1_ms')} | "
            f"{ms('torch_b8_ms')} | {ms('torch_b8_rss_mib')} | {r['threads']} | "
            f"{r['load_average_1min']:.2f} | {r['commit']} |")
    return "\n".join(lines) + "\n"


def run_latency(args: argparse.Namespace) -> None:
    tag = args.tag or ""
    for name in args.models:
        model, example = float_model(name)
        folder = args.work_dir / "latency" / name
        variants: dict[str, tuple[Path, str | None, str]] = {
            "FP32": (export_float(model, example, folder / "fp32.onnx"), "fp32", "—")}
        for setting in args.settings or ["W8A8", f"W8A8{SYMMETRIC}", f"W8A8{SYMMETRIC}{RESIDUAL}", "W4A8"]:
            directory, label = latency_checkpoint(args, name, setting, model)
            qmodel = reload(name, directory)
            path = export_onnx(qmodel, folder / f"{setting}_{args.op_style}.onnx", example, op_style=args.op_style)
            variants[setting] = (path, str(directory), label)
        if name in args.reference_models:
            for variant, activation_type in ORT_REFERENCES.items():
                path = ort_int8_reference(variants["FP32"][0], folder / f"ort_int8_qdq_{activation_type}.onnx",
                                          example, activation_type)
                variants[variant] = (path, None, f"onnxruntime quantize_static (QDQ, per-tensor int8 weights, "
                                                 f"{activation_type[1:].lower()} activations, 16 random images)")
        fp32: dict = {}
        for variant, (path, torch_source, label) in variants.items():
            row: dict = {"model": name, "variant": variant, "quantized_by": label, "onnx_bytes": path.stat().st_size,
                         "op_style": args.op_style if torch_source not in (None, "fp32") else None,
                         "seq_len": args.seq_len if name == "minilm_squad" else None, "runs": args.runs,
                         "warmup": args.warmup}
            for batch in (1, 8):
                ort_result = measure(args, "ort", str(path), name, batch)
                row[f"ort_b{batch}_ms"], row[f"ort_b{batch}_rss_mib"] = ort_result["median_ms"], \
                    ort_result["peak_rss_mib"]
                row[f"ort_b{batch}_p90_ms"] = ort_result["p90_ms"]
                torch_result = measure(args, "torch", torch_source, name, batch) if torch_source else {}
                row[f"torch_b{batch}_ms"] = torch_result.get("median_ms")
                row[f"torch_b{batch}_rss_mib"] = torch_result.get("peak_rss_mib")
            fp32 = fp32 or row
            row["file_ratio"] = row["onnx_bytes"] / fp32["onnx_bytes"]
            row["speedup_b1"] = fp32["ort_b1_ms"] / row["ort_b1_ms"]
            row["speedup_b8"] = fp32["ort_b8_ms"] / row["ort_b8_ms"]
            stamp(row, args.threads)
            print(f"{name:18s} {variant:22s} {row['onnx_bytes'] / 2**20:7.1f} MiB  ORT b1 {row['ort_b1_ms']:.1f} ms "
                  f"b8 {row['ort_b8_ms']:.1f} ms", flush=True)
            print("ROW " + json.dumps(row), flush=True)
            save_row(f"onnx_latency{tag}", row, ("model", "variant"), render_latency)


# ------------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agreement", action="store_true", help="PyTorch vs onnxruntime on the eval sets")
    parser.add_argument("--latency", action="store_true", help="file size, latency and RSS")
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"agreement: {', '.join(AGREEMENT)}; latency: {', '.join(LATENCY_MODELS)} "
                             "(and resnet20)")
    parser.add_argument("--settings", nargs="+", default=None,
                        help=f"override the settings, e.g. W8A8, W8A8{SYMMETRIC} (symmetric weights) or "
                             f"W8A8{SYMMETRIC}{RESIDUAL} (and 8-bit outputs before residual adds)")
    parser.add_argument("--method", default=None, choices=sorted(bench_core.METHODS),
                        help="agreement: override the quantization method of every model")
    parser.add_argument("--threads", type=int, default=None, help="default: 1 for --agreement, 2 for --latency")
    parser.add_argument("--limit", type=int, default=None,
                        help="quick look: at most this many calibration and evaluation samples (files _limit<N>)")
    parser.add_argument("--ort-optimization", choices=("all", "none"), default="all")
    parser.add_argument("--op-style", choices=("fused", "qdq"), default="fused",
                        help="export_onnx's op_style for the quantized files")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "work" / "bench_onnx",
                        help="quantized checkpoints and ONNX files (the latency part reuses the agreement's)")
    parser.add_argument("--reference-models", nargs="*", default=["resnet50"],
                        help="latency: models that get onnxruntime's own int8 quantization as a reference row")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=384, help="latency: tokens per MiniLM input (SQuAD windows)")
    parser.add_argument("--tag", default=None, help="suffix of the results files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker(args)
        return
    if args.agreement == args.latency:
        raise SystemExit("pass one of --agreement or --latency")
    args.threads = args.threads or (1 if args.agreement else 2)
    if args.agreement:
        args.models = args.models or list(AGREEMENT)
        run_agreement(args)
    else:
        args.models = args.models or list(LATENCY_MODELS)
        run_latency(args)


if __name__ == "__main__":
    main()
