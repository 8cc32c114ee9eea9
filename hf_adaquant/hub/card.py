"""Model card (README.md) for a quantized checkpoint: metadata with eval results, results, size, bits, recipe.

Built from ``huggingface_hub.ModelCardData`` + a Markdown body assembled here, so no jinja2 template is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .checkpoint_info import LAYER_BITS_KEYS, CheckpointInfo

__all__ = ["build_model_card", "eval_results_to_card"]

PROJECT_URL = "https://pypi.org/project/hf-adaquant/"
PAPER_URL = "https://arxiv.org/abs/2006.10518"

# Metrics reported as fractions in evaluate's format; shown as percentages in tables.
_MAX_INLINE_TABLE = 16
_FRACTION_METRICS = {"accuracy", "top1", "top5"}
_METRIC_LABELS = {"accuracy": "top-1 accuracy", "exact_match": "exact match", "f1": "F1"}


def _display(metric: str, value: float) -> str:
    return f"{100 * value:.2f}" if metric in _FRACTION_METRICS else f"{value:.2f}"


def _table_label(metric: str) -> str:
    label = _METRIC_LABELS.get(metric, metric)
    return f"{label} (%)" if metric in _FRACTION_METRICS else label


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _find(qcfg: Mapping[str, Any], key: str) -> Any:
    """A field of the quantization config, at the top level or one level down."""
    if key in qcfg:
        return qcfg[key]
    for value in qcfg.values():
        if isinstance(value, Mapping) and key in value:
            return value[key]
    return None


def _setting(info: CheckpointInfo) -> str:
    """``"W4A8"``, or ``"mixed W2-8/A4-8"`` when layers differ (first/last 8-bit layers do not count)."""
    qcfg = info.quantization_config
    w, a = _find(qcfg, "weight_bits"), _find(qcfg, "activation_bits")
    bits = set(info.layer_bits.values())
    first_last = _find(qcfg, "first_last_bits")
    body = {b for b in bits if b != (first_last, first_last)} or bits
    if len(body) > 1:
        ws = sorted({b[0] for b in body if b[0] is not None})
        acts = sorted({b[1] for b in body if b[1] is not None})
        return f"mixed W{ws[0]}-{ws[-1]}/A{acts[0]}-{acts[-1]}" if acts else f"mixed W{ws[0]}-{ws[-1]}"
    if body and w is None:
        w, a = next(iter(body))
    return f"W{w}A{a if a is not None else 'FP'}" if w is not None else "AdaQuant"


def eval_results_to_card(eval_results: Mapping[str, Any], setting: str) -> list[EvalResult]:
    """``EvalResult`` entries (model-index) for the quantized model and, as reference, the FP32 model."""
    dataset = eval_results.get("dataset") or {}
    task = str(eval_results.get("task", "image-classification"))
    out: list[EvalResult] = []
    for key, label in (("quantized", setting), ("fp32", "FP32 reference")):
        for metric, value in (eval_results.get(key) or {}).items():
            if not isinstance(value, (int, float)):
                continue
            out.append(EvalResult(
                task_type=task, dataset_type=str(dataset.get("type", "custom")),
                dataset_name=str(dataset.get("name", dataset.get("type", "custom"))),
                dataset_split=dataset.get("split"), metric_type=str(metric), metric_value=float(value),
                metric_name=f"{_METRIC_LABELS.get(metric, metric)} ({label})"))
    return out


def _results_section(eval_results: Mapping[str, Any]) -> list[str]:
    fp, q = eval_results.get("fp32") or {}, eval_results.get("quantized") or {}
    if not q:
        return []
    dataset = eval_results.get("dataset") or {}
    where = ", ".join(str(x) for x in (dataset.get("name"), dataset.get("split")) if x)
    if dataset.get("num_samples"):
        where += f" ({dataset['num_samples']} samples)"
    lines = ["## Results", "", f"Task: {eval_results.get('task', 'n/a')}; data: {where or 'n/a'}.", "",
             "| metric | FP32 | quantized | change |", "|---|---|---|---|"]
    for metric, value in q.items():
        if not isinstance(value, (int, float)):
            continue
        ref = fp.get(metric)
        change = _display(metric, value - ref) if isinstance(ref, (int, float)) else "—"
        if change != "—" and not change.startswith("-"):
            change = "+" + change
        ref_text = _display(metric, ref) if isinstance(ref, (int, float)) else "—"
        lines.append(f"| {_table_label(metric)} | {ref_text} | {_display(metric, value)} | {change} |")
    return lines + [""]


def _size_section(info: CheckpointInfo, eval_results: Mapping[str, Any]) -> list[str]:
    size = eval_results.get("size") or {}
    fp32 = size.get("fp32_bytes") or _find(info.quantization_config, "fp32_bytes")
    ckpt = info.checkpoint_bytes
    lines = ["## Size", "", "| | size | vs FP32 |", "|---|---|---|"]
    files = ", ".join(f"`{name}`" for name in info.weight_files)
    if isinstance(fp32, (int, float)) and fp32 > 0:
        lines.append(f"| FP32 weights | {_human_bytes(fp32)} | 1.00× |")
        lines.append(f"| this checkpoint ({files}) | {_human_bytes(ckpt)} | {ckpt / fp32:.3f}× |")
    else:
        lines.append(f"| this checkpoint ({files}) | {_human_bytes(ckpt)} | n/a |")
    return lines + [""]


def _load_section(info: CheckpointInfo, repo_id: str) -> list[str]:
    code = ["import hf_adaquant  # first: registers AdaQuant layers; without it the checkpoint refuses to load"]
    if info.library == "transformers":
        arch = (info.config.get("architectures") or ["AutoModel"])[0]
        auto = f"AutoModelFor{arch.split('For', 1)[1]}" if "For" in arch else "AutoModel"
        code += [f"from transformers import {auto}", "", f'model = {auto}.from_pretrained("{repo_id}")',
                 "# or, for any architecture:", f'model = hf_adaquant.load_quantized("{repo_id}")']
    elif info.library == "timm":
        code += ["", f'model = hf_adaquant.load_quantized("{repo_id}")']
    else:  # a plain PyTorch module: the checkpoint holds weights, the architecture comes from its code
        cls = info.config.get("hf_adaquant_model_class", "the float model class")
        code += ["", f"float_model = ...  # the float architecture ({cls}), built as it was for quantization",
                 f'model = hf_adaquant.load_quantized("{repo_id}", model=float_model)']
    return (["## How to load", "", "Needs `pip install hf-adaquant`. Import it **before** loading: it teaches "
             "transformers/timm how to rebuild the quantized layers.", "", "```python"] + code + ["```", ""])


ONNX_FILE = "model.onnx"
"""The ONNX export (``hf-adaquant export``) a pushed folder may hold; the card then says how to run it."""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _onnx_inputs(path: Path) -> list[tuple[str, list[int | str]]]:
    """``(name, dims)`` of the ONNX file's inputs; empty when ``onnx`` is not installed or cannot read it."""
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # the optional extra missing, or a file it cannot parse: the snippet stays generic
        return []
    weights = {t.name for t in graph.initializer}
    return [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in graph.input if i.name not in weights]


def _onnx_section(info: CheckpointInfo, repo_id: str, base_model: str | None) -> list[str]:
    """How to run the folder's ``model.onnx`` with onnxruntime (nothing when there is none)."""
    path = info.path / ONNX_FILE
    if not path.is_file():
        return []
    inputs = _onnx_inputs(path)
    code = ["import numpy as np", "import onnxruntime as ort", "from huggingface_hub import hf_hub_download", "",
            f'session = ort.InferenceSession(hf_hub_download("{repo_id}", "{ONNX_FILE}"))']
    if info.library == "transformers":
        has_tokenizer = any((info.path / name).is_file() for name in _TOKENIZER_FILES)
        source = repo_id if has_tokenizer else (base_model or "<the float model's tokenizer>")
        code += ["from transformers import AutoTokenizer", "",
                 f'tokenizer = AutoTokenizer.from_pretrained("{source}")',
                 'encoded = tokenizer("What is quantized?", "The weights are.", return_tensors="np")',
                 "names = {i.name for i in session.get_inputs()}",
                 "outputs = session.run(None, {k: v for k, v in encoded.items() if k in names})"]
    else:
        dims = inputs[0][1][1:] if len(inputs) == 1 else []
        shape = ", ".join(str(d) for d in dims) if dims and all(isinstance(d, int) and d > 0 for d in dims) \
            else "3, 224, 224"
        code += [f"images = np.zeros((1, {shape}), dtype=np.float32)  # preprocessed as for the float model",
                 "outputs = session.run(None, {session.get_inputs()[0].name: images})"]
    names = ", ".join(f"`{name}`" for name, _ in inputs)
    return (["## Run with onnxruntime", "",
             f"`{ONNX_FILE}` ({_human_bytes(path.stat().st_size)}) holds the integer weight codes as ONNX "
             "initializers with `DequantizeLinear` per output channel and each activation quantizer as "
             "`QuantizeLinear`/`DequantizeLinear`: standard ONNX, computing what the PyTorch model computes"
             f"{f' (inputs {names})' if names else ''}. It needs `onnxruntime` and `huggingface_hub`"
             f"{' (and `transformers` for the tokenizer)' if info.library == 'transformers' else ''}, not "
             "hf-adaquant.", "", "```python"] + code + ["```", ""])


def _bits_section(info: CheckpointInfo) -> list[str]:
    if not info.layer_bits:
        return []
    lines = ["### Bits per layer", "", f"<details><summary>{len(info.layer_bits)} quantized layers</summary>",
             "", "| layer | weight bits | activation bits |", "|---|---|---|"]
    for name, (w, a) in info.layer_bits.items():
        lines.append(f"| `{name}` | {w if w is not None else '—'} | {a if a is not None else 'float'} |")
    return lines + ["", "</details>", ""]


def _settings_only(data: Mapping[str, Any]) -> dict[str, Any]:
    """The config without per-layer tables (shown above, and hundreds of lines for a large model)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            if key in LAYER_BITS_KEYS or len(value) > _MAX_INLINE_TABLE:
                out[key] = f"<{len(value)} entries>"
            else:
                out[key] = _settings_only(value)
        else:
            out[key] = value
    return out


def _config_section(info: CheckpointInfo) -> list[str]:
    lines: list[str] = []
    if info.recipe_text:
        lines += ["### Recipe", "", "Reproduce with `hf-adaquant quantize --recipe recipe.yaml --output out/` "
                  "(the recipe is part of this repository).", "", "```yaml", info.recipe_text.rstrip(), "```", ""]
    qcfg = _settings_only(info.quantization_config)
    lines += ["### quantization_config", "", "```json", json.dumps(qcfg, indent=2, sort_keys=True, default=str),
              "```", ""]
    return lines


def build_model_card(info: CheckpointInfo, repo_id: str, *, eval_results: Mapping[str, Any] | None = None,
                     base_model: str | None = None, tags: Sequence[str] | None = None) -> ModelCard:
    """The model card of a checkpoint about to be pushed to ``repo_id``.

    Args:
        info: what the checkpoint folder holds (see :func:`read_checkpoint_info`).
        repo_id: target Hub repository (used in the loading snippet and as model name).
        eval_results: ``{"task", "dataset": {"name", "type", "split", "num_samples"}, "fp32": {...},
            "quantized": {...}, "size": {"fp32_bytes"}}``; defaults to the folder's ``eval_results.json``.
        base_model: Hub id of the float model (metadata ``base_model``).
        tags: extra Hub tags, after ours (duplicates dropped).
    """
    eval_results = eval_results if eval_results is not None else (info.eval_results or {})
    setting = _setting(info)
    model_name = repo_id.split("/")[-1]
    card_tags = ["hf-adaquant", "adaquant", "quantized", "post-training-quantization", setting.split()[0].lower()]
    if info.library in ("timm", "transformers"):
        card_tags.append(info.library)
    if (info.path / ONNX_FILE).is_file():
        card_tags.append("onnx")
    card_tags = list(dict.fromkeys([*card_tags, *(tags or ())]))  # the user's tags after ours, no duplicates
    task = eval_results.get("task")
    data = ModelCardData(
        model_name=model_name, base_model=base_model, library_name="hf-adaquant", tags=card_tags,
        pipeline_tag=task if task in ("image-classification", "question-answering") else None,
        eval_results=eval_results_to_card(eval_results, setting) or None)
    pipeline = _find(info.quantization_config, "pipeline")
    intro = (f"{setting} post-training quantization of "
             f"{f'[`{base_model}`](https://huggingface.co/{base_model})' if base_model else 'a float model'} "
             f"with [AdaQuant]({PAPER_URL}) (Hubara et al., 2021)"
             f"{f', {pipeline} pipeline' if pipeline else ''}, made with [hf-adaquant]({PROJECT_URL}). "
             "Weights are stored as packed integer codes with per-channel scales and zero-points; layers run "
             "fake-quantized (dequantized on the fly) in PyTorch.")
    body = [f"# {model_name}", "", intro, ""]
    body += _results_section(eval_results) + _size_section(info, eval_results) + _load_section(info, repo_id)
    body += _onnx_section(info, repo_id, base_model)
    body += ["## Quantization", ""] + _bits_section(info) + _config_section(info)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
