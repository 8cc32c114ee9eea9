"""``hf-adaquant``: quantize a model from a recipe, evaluate a checkpoint, push it to the Hub.

    hf-adaquant quantize --recipe recipes/cifar10-resnet20-w4a4.yaml --output out/r20 [--set quantization.iterations=50]
    hf-adaquant quantize -m timm/resnet18.a1_in1k --weights int4 --activations int8 --dataset calib/ --output out/r18
    hf-adaquant evaluate out/r20 [--recipe R]
    hf-adaquant push out/r20 --repo-id me/resnet20-w4a4 [--private] [--token-env HF_TOKEN]
    hf-adaquant export --checkpoint out/r20 --output out/r20/model.onnx [--opset 21] [--input-shape 3,32,32]
    hf-adaquant quantize --recipe R --output out/r20 --export-onnx     # also writes out/r20/model.onnx

Every failure ends with one line on stderr, ``hf-adaquant COMMAND: error: TYPE: MESSAGE``, and a non-zero exit
status: 2 for bad input (a malformed recipe, a missing file, an invalid checkpoint), 1 for an unexpected internal
error, 3 when ``quantize`` saved its checkpoint but the evaluation after it failed (the checkpoint is kept), 130 on
Ctrl-C. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from .utils.files import atomic_write_text, remove_stale_temporaries, replace_directory, temporary_name

__all__ = ["add_model_arguments", "build_parser", "main", "run_command"]

_logger = logging.getLogger("hf_adaquant.cli")
ONNX_FILE = "model.onnx"  # the name push_to_hub's model card documents
EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_EVALUATION_FAILED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class CliError(Exception):
    """Bad command-line input: reported as one line, no traceback."""


class EvaluationFailed(Exception):
    """The quantized checkpoint was saved at ``checkpoint``; only the evaluation after it failed (``__cause__``)."""

    def __init__(self, checkpoint: Path, summary: dict[str, Any]) -> None:
        super().__init__(f"evaluation failed; the quantized checkpoint is saved at {checkpoint}")
        self.checkpoint = checkpoint
        self.summary = summary


# ------------------------------------------------------------------------------------------------------- parser
def add_model_arguments(q: argparse.ArgumentParser) -> None:
    """``quantize`` without a recipe (also used by ``optimum-cli adaquant quantize``)."""
    m = q.add_argument_group("without a recipe", "what a recipe would say, on the command line")
    m.add_argument("-m", "--model", default=None, help="Hub id (timm/... ids are timm models) or local model folder")
    m.add_argument("--task", default=None, help="transformers task: question-answering, sequence-classification, "
                                                "image-classification (default: from the folder's config.json)")
    m.add_argument("--library", choices=("timm", "transformers"), default=None,
                   help="library of the model (default: guessed from the id or folder)")
    m.add_argument("--weights", default="int4", help="weight bit-width: int2..int8 (default int4)")
    m.add_argument("--activations", default="int8", help="activation bit-width: int2..int8 or none (default int8)")
    m.add_argument("--pipeline", default="advanced", help="light or advanced (default advanced)")
    m.add_argument("--dataset", default=None, help="calibration data: image folder / Hub image dataset (vision), "
                                                   ".json(l) file or Hub text dataset (text models)")
    m.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset")
    m.add_argument("--dataset-split", default="train", help="split of the calibration dataset (default train)")
    m.add_argument("--text-column", default=None, help="text column of a text dataset (default: 'text')")
    m.add_argument("--num-samples", type=int, default=128, help="calibration samples (default 128)")
    m.add_argument("--revision", default=None, help="model revision (branch, tag or commit) on the Hub")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="allow a transformers model to run code from its repository (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-adaquant", description="AdaQuant post-training quantization.",
                                     epilog="See recipes/*.yaml for ready-made recipes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quantize", help="quantize a model (from a recipe, or -m MODEL --dataset DATA) and save a "
                                        "checkpoint")
    q.add_argument("--recipe", default=None, help="recipe .yaml file (or the name of one in recipes/)")
    q.add_argument("--output", required=True, type=Path, help="checkpoint folder to write")
    add_model_arguments(q)
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. quantization.iterations=50 (repeatable)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output folder (or a file at that path)")
    q.add_argument("--no-eval", action="store_true", help="skip the recipe's evaluation")
    q.add_argument("--work-dir", type=Path, default=None,
                   help="checkpoint finished AdaQuant layers here; re-running with it resumes an interrupted run")
    q.add_argument("--export-onnx", action="store_true",
                   help=f"also export the quantized model to OUTPUT/{ONNX_FILE} (integer weights, run by "
                        "onnxruntime; needs the onnx extra)")

    e = sub.add_parser("evaluate", help="reload a checkpoint and run its recipe's evaluation")
    e.add_argument("dir", type=Path, help="checkpoint folder written by 'quantize'")
    e.add_argument("--recipe", help="recipe to take the evaluation from (default: DIR/recipe.yaml)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. evaluation.num_samples=500")

    p = sub.add_parser("push", help="upload a checkpoint with a model card to the Hugging Face Hub")
    p.add_argument("dir", type=Path, help="checkpoint folder written by 'quantize'")
    p.add_argument("--repo-id", required=True, help="target repository, e.g. me/resnet20-adaquant-w4a4")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to main")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--commit-description", default=None)
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    p.add_argument("--tag", dest="tags", action="append", default=None, metavar="TAG",
                   help="extra Hub tag for the model card (repeatable)")
    p.add_argument("--token-env", default=None, metavar="VAR",
                   help="environment variable holding the Hub token (default: huggingface_hub's own lookup: "
                        "HF_TOKEN or the stored login). Tokens are never taken as arguments.")

    x = sub.add_parser("export", help="export a checkpoint to ONNX (integer weights, run by onnxruntime)")
    x.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder written by 'quantize'")
    x.add_argument("--output", required=True, type=Path, help=".onnx file to write")
    x.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the lowest that stores every weight width in its own type)")
    x.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="shape of one input sample, for models that do not state it (plain PyTorch models)")
    x.add_argument("--recipe", default=None,
                   help="recipe that builds the float skeleton of a plain PyTorch checkpoint (default: "
                        "CHECKPOINT/recipe.yaml)")
    return parser


# ----------------------------------------------------------------------------------------------------- commands
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
                             opset=args.opset)


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


# --------------------------------------------------------------------------------------------------------- main
def _bad_input_types() -> tuple[type[BaseException], ...]:
    # ValueError covers RecipeError, CheckpointError and huggingface_hub's validation errors; OSError covers
    # missing files and Hub HTTP errors.
    return (CliError, ValueError, OSError, ImportError)


def _describe(err: BaseException) -> str:
    """``Type: message`` on one line (the CLI's own errors need no type)."""
    message = " ".join(str(err).split())
    if isinstance(err, CliError):
        return message or type(err).__name__
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _report_failure(command: str, err: BaseException) -> int:
    """Print the one-line error for ``err`` and return the exit status."""
    prefix = f"hf-adaquant {command}: error:"
    if isinstance(err, EvaluationFailed):
        cause = err.__cause__ or err
        print(json.dumps({**err.summary, "evaluation_error": _describe(cause)}, indent=2))
        print(f"{prefix} {_describe(cause)} (only the evaluation failed: the quantized checkpoint is saved at "
              f"{err.checkpoint})", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(cause, KeyboardInterrupt) else EXIT_EVALUATION_FAILED
    if isinstance(err, KeyboardInterrupt):
        print(f"{prefix} KeyboardInterrupt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(err, _bad_input_types()):
        print(f"{prefix} {_describe(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{prefix} {_describe(err)} (internal error; run with --debug for the traceback)", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def main(argv: Sequence[str] | None = None, *, hub_api: Any = None) -> int:
    """Entry point of the ``hf-adaquant`` console script; returns the exit status.

    Args:
        argv: arguments (default ``sys.argv[1:]``).
        hub_api: an ``HfApi``-like object for ``push`` (tests inject a local stand-in).
    """
    return run_command(build_parser().parse_args(argv), hub_api=hub_api)


def run_command(args: argparse.Namespace, *, hub_api: Any = None) -> int:
    """Run parsed ``hf-adaquant`` arguments (``optimum-cli adaquant`` parses its own, then calls this); returns
    the exit status."""
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "quantize":
            result: Any = run_quantize(args)
        elif args.command == "evaluate":
            result = run_evaluate(args)
        elif args.command == "export":
            result = run_export(args)
        else:
            result = run_push(args, hub_api)
    except (Exception, KeyboardInterrupt) as err:
        if args.debug:
            raise
        return _report_failure(args.command, err)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
