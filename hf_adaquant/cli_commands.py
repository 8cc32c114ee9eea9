"""The ``hf-adaquant`` commands (quantize, evaluate, export, push) on parsed arguments; :mod:`hf_adaquant.cli` holds
the parser, the entry point and the one-line error reporting.

The heavy parts (models, recipes, the Hub, ONNX) are imported when a command runs, so ``hf-adaquant --help`` and
``optimum-cli``'s plug-in discovery stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .utils.files import atomic_write_text, remove_stale_temporaries, replace_directory, temporary_name

__all__ = ["CliError", "EvaluationFailed", "ONNX_FILE", "run_evaluate", "run_export", "run_push", "run_quantize"]

_logger = logging.getLogger("hf_adaquant.cli")  # the CLI's logger, whichever module logs
ONNX_FILE = "model.onnx"  # the name push_to_hub's model card documents


class CliError(Exception):
    """Bad command-line input: reported as one line, no traceback."""


class EvaluationFailed(Exception):
    """The quantized checkpoint was saved at ``checkpoint``; only the evaluation after it failed (``__cause__``)."""

    def __init__(self, checkpoint: Path, summary: dict[str, Any]) -> None:
        super().__init__(f"evaluation failed; the quantized checkpoint is saved at {checkpoint}")
        self.checkpoint = checkpoint
        self.summary = summary


def _eval_record(evaluator: Any, metrics: dict[str, dict[str, float]], size: dict[str, int]) -> dict[str, Any]:
    return {"task": evaluator.recipe.evaluation["task"], "dataset": evaluator.dataset,
            "fp32": metrics.get("fp32"), "quantized": metrics["quantized"], "size": size}


def _write_checkpoint(qmodel: Any, recipe: Any, built: Any, output: Path) -> dict[str, int]:
    """Save into a staging folder next to ``output``, then swap it in whole (replacing a folder or a file there)."""
    from .hub import RECIPE_FILE
    from .serialization import save_quantized
    from .size import model_size

    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output.parent, output.name)  # staging folders of killed runs
    staging = temporary_name(output)
    staging.mkdir()  # mode from the umask, like any folder the user makes
    try:
        save_quantized(qmodel, staging)
        (staging / RECIPE_FILE).write_text(recipe.to_yaml())
        if built.tokenizer is not None:
            built.tokenizer.save_pretrained(str(staging))
        size = {"fp32_bytes": model_size(qmodel).fp32_bytes,
                "checkpoint_bytes": sum(p.stat().st_size for p in staging.glob("*.safetensors"))}
        replace_directory(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return size


def _evaluate_checkpoint(recipe: Any, built: Any, qmodel: Any, output: Path, summary: dict[str, Any]) -> None:
    """Run the recipe's evaluation and record it next to the checkpoint (already in place, kept if this fails)."""
    from .hub import EVAL_RESULTS_FILE
    from .recipes import build_evaluator

    try:
        evaluator = build_evaluator(recipe, built)
        if evaluator is None:
            return
        models = {"fp32": built.model, "quantized": qmodel} if recipe.evaluation["compare_fp"] else \
            {"quantized": qmodel}
        record = _eval_record(evaluator, evaluator(models), summary["size"])
        atomic_write_text(output / EVAL_RESULTS_FILE, json.dumps(record, indent=2) + "\n")
    except (Exception, KeyboardInterrupt) as err:
        raise EvaluationFailed(output, summary) from err
    summary.update(fp32=record["fp32"], quantized=record["quantized"])


def _recipe_from_args(args: argparse.Namespace) -> Any:
    """The recipe file, or the recipe that ``-m MODEL --dataset DATA ...`` stands for."""
    from .recipes import apply_overrides, load_recipe, parse_recipe
    from .recipes.from_model import recipe_for_model

    if (args.recipe is None) == (args.model is None):
        raise CliError("pass either --recipe or -m/--model (with --dataset)")
    if args.recipe is not None:
        return load_recipe(args.recipe, args.overrides)
    if args.dataset is None:
        raise CliError("-m/--model needs calibration data: --dataset (an image folder, a .json file of texts or "
                       "a Hub dataset name)")
    raw = recipe_for_model(args.model, dataset=args.dataset, num_samples=args.num_samples, task=args.task,
                           library=args.library, weights=args.weights, activations=args.activations,
                           pipeline=args.pipeline, dataset_config=args.dataset_config,
                           dataset_split=args.dataset_split, text_column=args.text_column, revision=args.revision,
                           trust_remote_code=args.trust_remote_code)
    return parse_recipe(apply_overrides(raw, args.overrides))


def _check_onnx_extra() -> None:
    """Before a long quantization run: fail now if ``--export-onnx`` could not run at the end."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise CliError(f"--export-onnx needs the onnx extra: pip install 'hf-adaquant[onnx]' ({exc})") from None


def _export_after_quantize(qmodel: Any, calibration: list[Any], output: Path) -> dict[str, Any]:
    """Export the quantized model next to its saved checkpoint, traced on two calibration samples."""
    from .export import ExportError, export_onnx
    from .export.onnx import file_opset
    from .utils.batches import slice_batch

    try:
        path = export_onnx(qmodel, output / ONNX_FILE, slice_batch(calibration[0], 0, 2))
    except ExportError as exc:
        raise CliError(f"the checkpoint is saved at {output}, but the ONNX export failed: {exc}") from exc
    return {"output": str(path), "opset": file_opset(path), "onnx_bytes": path.stat().st_size}


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from . import quantize
    from .recipes import build_calibration, build_model

    if getattr(args, "export_onnx", False):
        _check_onnx_extra()
    recipe = _recipe_from_args(args)
    output: Path = args.output
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise CliError(f"output {output} exists and is not empty (use --overwrite to replace it)")
    built = build_model(recipe)
    calibration = build_calibration(recipe, built)
    _logger.info("quantizing %s with %d calibration batches", recipe.name, len(calibration))
    qmodel = quantize(built.model, calibration, recipe.quantization, work_dir=args.work_dir)
    from .distributed import is_main_process

    if not is_main_process():  # under torchrun / accelerate launch every rank quantizes; rank 0 writes
        return {"output": str(output), "recipe": recipe.name, "rank": "non-main"}

    size = _write_checkpoint(qmodel, recipe, built, output)
    _logger.info("quantized checkpoint saved at %s", output)
    summary: dict[str, Any] = {"output": str(output), "recipe": recipe.name, "size": size}
    if getattr(args, "export_onnx", False):
        summary["onnx"] = _export_after_quantize(qmodel, calibration, output)
    if not args.no_eval:  # after the save: a failed evaluation must not cost the finished checkpoint
        _evaluate_checkpoint(recipe, built, qmodel, output, summary)
    return summary


def _load_for_eval(directory: Path, recipe: Any) -> tuple[Any, Any]:
    """The reloaded model and what the evaluator needs (plain PyTorch checkpoints use the recipe's model as the
    skeleton; SQuAD needs the tokenizer saved next to the checkpoint, else the recipe's)."""
    from .recipes import BuiltModel, build_model
    from .serialization import load_quantized

    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if "model_type" not in config and "architecture" not in config:
        qmodel = load_quantized(directory, model=build_model(recipe).model)
    else:
        qmodel = load_quantized(directory)
    tokenizer = None
    if recipe.evaluation["task"] == "question-answering":
        from transformers import AutoTokenizer

        has_tokenizer = (directory / "tokenizer_config.json").is_file()
        tokenizer = AutoTokenizer.from_pretrained(str(directory)) if has_tokenizer else build_model(recipe).tokenizer
    return qmodel, BuiltModel(model=qmodel, tokenizer=tokenizer)


def run_evaluate(args: argparse.Namespace) -> dict[str, float]:
    from .hub import RECIPE_FILE
    from .recipes import build_evaluator, load_recipe

    directory: Path = args.dir
    if not directory.is_dir():
        raise CliError(f"checkpoint folder not found: {directory}")
    recipe_path = args.recipe or directory / RECIPE_FILE
    if args.recipe is None and not Path(recipe_path).is_file():
        raise CliError(f"{directory} has no {RECIPE_FILE}: pass --recipe")
    recipe = load_recipe(recipe_path, args.overrides)
    if recipe.evaluation is None:
        raise CliError(f"recipe {recipe.name} has no evaluation section")
    qmodel, built = _load_for_eval(directory, recipe)
    evaluator = build_evaluator(recipe, built)
    return evaluator({"quantized": qmodel})["quantized"]


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CliError(f"--input-shape must be comma-separated integers such as 3,224,224, got {text!r}") from None
    return shape


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    from .export import export_checkpoint
    from .hub import RECIPE_FILE
    from .recipes import build_model, load_recipe

    directory: Path = args.checkpoint
    if not directory.is_dir():
        raise CliError(f"checkpoint folder not found: {directory}")
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    skeleton = None
    if "model_type" not in config and "architecture" not in config:  # plain PyTorch: the recipe builds it
        recipe_path = args.recipe or directory / RECIPE_FILE
        if args.recipe is None and not Path(recipe_path).is_file():
            raise CliError(f"{directory} is a plain PyTorch checkpoint without {RECIPE_FILE}: pass --recipe")
        skeleton = build_model(load_recipe(recipe_path, check_files=False)).model
    return export_checkpoint(directory, args.output, model=skeleton, input_shape=_parse_shape(args.input_shape),
                             opset=args.opset, op_style=getattr(args, "op_style", "fused"))


def run_push(args: argparse.Namespace, hub_api: Any = None) -> dict[str, Any]:
    from .hub import RECIPE_FILE, push_to_hub
    from .hub.push import DEFAULT_COMMIT_MESSAGE
    from .recipes import load_recipe

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise CliError(f"environment variable {args.token_env} is not set or empty")
    recipe_path = args.dir / RECIPE_FILE
    base_model = load_recipe(recipe_path, check_files=False).base_model_id if recipe_path.is_file() else None
    result = push_to_hub(args.dir, args.repo_id, api=hub_api, token=token, private=True if args.private else None,
                         commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE, create_pr=args.create_pr,
                         commit_description=args.commit_description, revision=args.revision, tags=args.tags,
                         base_model=base_model)
    url = getattr(result, "pr_url", None) or getattr(result, "commit_url", None)
    return {"repo_id": args.repo_id, "url": url}
