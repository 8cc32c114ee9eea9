#!/usr/bin/env python
"""SQuAD benchmark of the offline MiniLM-SQuAD model (BERT architecture): FP32, light and advanced at W8A8/W4A8.

Calibration: ``--calib`` features drawn from SQuAD v1.1 dev articles 0-39 (the model's fine-tuning articles).
Evaluation: articles 40-47 (1,589 questions, never seen), EM/F1 in ``evaluate``'s squad format. Quantization
follows the BERT QA policy of ``hf_adaquant.tasks.squad.policy`` (encoder Linears at the setting, QA head W8A8,
embedding tables at ``--embedding-bits`` per value with a step per row (default 8; ``none``: float), attention
matmuls/LayerNorm/softmax float). Results merge into ``benchmarks/results/squad_minilm.json`` (one entry per run
name, so runs can be redone one at a time; quantized runs are named with their tables' bits, e.g.
``light:W8A8 emb=8``, ``light:W8A8 emb=fp``) and the table ``squad_minilm.md``.

Usage (other jobs share the machine: one thread):
    OMP_NUM_THREADS=1 python scripts/bench_squad.py                       # all runs
    OMP_NUM_THREADS=1 python scripts/bench_squad.py --runs fp32 light:W8A8 --config '{"activation_range_method": "minmax"}'
    OMP_NUM_THREADS=1 python scripts/bench_squad.py --runs light:W8A8 light:W4A8 --embedding-bits none  # F1 effect
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from hf_adaquant import quantize
from hf_adaquant.data import shared_dir
from hf_adaquant.tasks.squad import (CALIBRATION_ARTICLES, EVAL_ARTICLES, bert_qa_quantization_config,
                                     evaluate_squad_model, load_squad_examples, squad_calibration_batches)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DEFAULT_RUNS = ["fp32", "light:W8A8", "light:W4A8", "advanced:W8A8", "advanced:W4A8"]
TARGET_F1_DROP = {"W8A8": 0.5, "W4A8": 1.5}
# CPU budget of a shared 2-core machine: the sequential stages (bias correction, sequential AdaQuant) each cost
# ~37 partial forward passes over the calibration set. Light skips bias correction (ranges only: no BatchNorm
# to tune in BERT either); advanced uses parallel AdaQuant (FP inputs, one capture pass per group of layers)
# with short runs. Override any field with --config.
PIPELINE_PRESETS = {
    "light": {"bias_correction": False},
    "advanced": {"variant": "parallel", "iterations": 50, "batch_size": 8, "bias_tuning_steps": 25,
                 "bias_tuning_batch_size": 8},
}


def parse_run(run: str) -> tuple[str, int | None, int | None]:
    if run == "fp32":
        return "fp32", None, None
    pipeline, _, setting = run.partition(":")
    if pipeline not in ("light", "advanced") or not setting.upper().startswith("W") or "A" not in setting.upper():
        raise SystemExit(f"run must be 'fp32' or '<light|advanced>:W<w>A<a>', got {run!r}")
    w, a = setting.upper()[1:].split("A")
    return pipeline, int(w), int(a)


def embedding_bits(text: str) -> int | None:
    """``--embedding-bits``: an integer 2..8, or none/fp for float tables."""
    if text.lower() in ("none", "fp", "fp32"):
        return None
    if not text.isdigit() or not 2 <= int(text) <= 8:
        raise argparse.ArgumentTypeError(f"expected 2..8 or 'none', got {text!r}")
    return int(text)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def markdown(data: dict) -> str:
    fp = data["runs"].get("fp32", {}).get("metrics")
    lines = [
        "# MiniLM-SQuAD (BERT, 6 layers) on SQuAD v1.1 dev articles 40-47",
        "",
        f"{data['eval']['questions']} questions, max_length {data['eval']['max_length']}, stride "
        f"{data['eval']['stride']}; calibration: {data['calibration']['num_features']} features from articles "
        f"0-39. Policy: encoder Linears at the setting, `qa_outputs` W8A8, embedding tables at `emb=` bits per "
        "value with a step per row (`fp`: float; runs named without `emb=` predate quantized tables: float), "
        "attention matmuls / LayerNorm / softmax float. Targets: F1 drop <= 0.5 (W8A8), <= 1.5 (W4A8).",
        "",
        "| run | EM | F1 | F1 drop | target | calibration s | eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    names = [n for n in DEFAULT_RUNS if n in data["runs"]] + sorted(set(data["runs"]) - set(DEFAULT_RUNS))
    for name in names:
        r = data["runs"][name]
        m = r["metrics"]
        drop = "" if fp is None or name == "fp32" else f"{fp['f1'] - m['f1']:.2f}"
        target = r.get("target_f1_drop")
        met = "" if target is None or not drop else f"<= {target} ({'met' if float(drop) <= target else 'MISSED'})"
        lines.append(f"| {name} | {m['exact_match']:.2f} | {m['f1']:.2f} | {drop} | {met} | "
                     f"{r.get('calibration_seconds', 0.0):.0f} | {r['eval_seconds']:.0f} |")
    presets = "; ".join(f"{k}: {json.dumps(v)}" for k, v in PIPELINE_PRESETS.items())
    lines += ["", f"Pipeline presets ({presets}); calibration windows {data['calibration'].get('max_length')} "
              f"tokens, stride {data['calibration'].get('stride')}. CPU, {data['threads']} thread, on a 2-core "
              "machine shared with other jobs: the seconds are indicative only (see load_average_1min in the "
              "json).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="fp32 and/or <pipeline>:W<w>A<a>")
    parser.add_argument("--calib", type=int, default=256, help="calibration features (articles 0-39)")
    parser.add_argument("--calib-batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--calib-max-length", type=int, default=192,
                        help="calibration windows (the model was fine-tuned on 192-token windows, stride 64)")
    parser.add_argument("--calib-stride", type=int, default=64)
    parser.add_argument("--eval-articles", type=int, nargs="+", default=list(EVAL_ARTICLES),
                        help="quick looks only: the reported numbers use all of 40-47")
    parser.add_argument("--config", default="", help="JSON dict of AdaQuantConfig overrides for every run")
    parser.add_argument("--tag", default="", help="suffix of the results files (squad_minilm<tag>.json)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding-bits", type=embedding_bits, default=8,
                        help="bits per value of the embedding tables (2..8), or 'none' to keep them float")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if args.render:
        path = RESULTS / f"squad_minilm{args.tag}.json"
        write_atomic(path.with_suffix(".md"), markdown(json.loads(path.read_text())))
        return
    if set(args.eval_articles) & set(CALIBRATION_ARTICLES):
        raise SystemExit("evaluation articles must not overlap the calibration articles 0-39")
    torch.set_num_threads(args.threads)
    shared = shared_dir()
    if shared is None:
        raise SystemExit("../shared is not available: the benchmark needs the offline MiniLM-SQuAD model and data")
    import transformers

    model_dir = shared / "models" / "minilm-squad"
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    # Stored in fp16: float32 is the FP baseline (RESULTS.md).
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=torch.float32).eval()
    squad = shared / "data" / "squad" / "dev-v1.1.json.gz"
    eval_examples = load_squad_examples(squad, articles=args.eval_articles)
    calib = squad_calibration_batches(load_squad_examples(squad, articles=CALIBRATION_ARTICLES), tokenizer,
                                      args.calib, args.calib_batch_size, max_length=args.calib_max_length,
                                      stride=args.calib_stride, seed=args.seed)
    overrides = json.loads(args.config) if args.config else {}
    out_json = RESULTS / f"squad_minilm{args.tag}.json"
    data = json.loads(out_json.read_text()) if out_json.exists() else {}
    eval_info = {"articles": args.eval_articles, "questions": len(eval_examples), "max_length": args.max_length,
                 "stride": args.stride, "n_best": 20, "max_answer_length": 30}
    if data.get("eval") != eval_info:
        data = {}  # another evaluation setting: earlier numbers are not comparable
    data.update({"model": "shared/models/minilm-squad (float32)", "eval": eval_info, "threads": args.threads,
                 "calibration": {"articles": "0-39", "num_features": args.calib, "batch_size": args.calib_batch_size,
                                 "max_length": args.calib_max_length, "stride": args.calib_stride,
                                 "seed": args.seed}})
    data.setdefault("runs", {})
    for run in args.runs:
        pipeline, wbits, abits = parse_run(run)
        entry: dict = {}
        qmodel = model
        if pipeline != "fp32":
            config = bert_qa_quantization_config(wbits, abits, pipeline=pipeline, seed=args.seed, progress=False,
                                                 **{**PIPELINE_PRESETS[pipeline], "embedding_bits": args.embedding_bits,
                                                    **overrides})
            run = f"{run} emb={config.embedding_bits or 'fp'}"
            start = time.perf_counter()
            qmodel = quantize(model, calib, config)
            entry["calibration_seconds"] = time.perf_counter() - start
            report = qmodel.hf_adaquant_report
            entry["stage_seconds"] = report.stage_seconds
            entry["config"] = config.to_dict()
            entry["quantized_layers"] = len(report.plan)
            entry["target_f1_drop"] = TARGET_F1_DROP.get(f"W{wbits}A{abits}")
            if report.layers:
                entry["layer_mse"] = {l["name"]: [l["mse_before"], l["mse_after"]] for l in report.layers}
        start = time.perf_counter()
        entry["metrics"] = evaluate_squad_model(qmodel, tokenizer, eval_examples, batch_size=args.eval_batch_size,
                                                max_length=args.max_length, stride=args.stride)
        entry["eval_seconds"] = time.perf_counter() - start
        entry["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        entry["load_average_1min"] = os.getloadavg()[0]  # timings are only comparable on an idle machine
        # Several bench processes may share the file (one per run group): merge into its latest content.
        latest = json.loads(out_json.read_text()) if out_json.exists() else {}
        if latest.get("eval") == eval_info:
            data["runs"] = {**latest.get("runs", {}), **data["runs"]}
        data["runs"][run] = entry
        m = entry["metrics"]
        print(f"{run:14s} EM={m['exact_match']:.2f} F1={m['f1']:.2f} calib={entry.get('calibration_seconds', 0):.0f}s "
              f"eval={entry['eval_seconds']:.0f}s", flush=True)
        write_atomic(out_json, json.dumps(data, indent=2) + "\n")
        write_atomic(RESULTS / f"squad_minilm{args.tag}.md", markdown(data))


if __name__ == "__main__":
    sys.exit(main())
