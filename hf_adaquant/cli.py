"""``hf-adaquant``: quantize a model from a recipe, evaluate a checkpoint, push it to the Hub.

    hf-adaquant quantize --recipe recipes/cifar10-resnet20-w4a4.yaml --output out/r20 [--set quantization.iterations=50]
    hf-adaquant quantize -m timm/resnet18.a1_in1k --weights int4 --activations int8 --dataset calib/ --output out/r18
    hf-adaquant evaluate out/r20 [--recipe R]
    hf-adaquant push out/r20 --repo-id me/resnet20-w4a4 [--private] [--token-env HF_TOKEN]
    hf-adaquant export --checkpoint out/r20 --output out/r20/model.onnx [--opset 21] [--op-style qdq]
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
import sys
from pathlib import Path
from typing import Any, Sequence

from .cli_commands import ONNX_FILE, CliError, EvaluationFailed, run_evaluate, run_export, run_push, run_quantize

__all__ = ["add_model_arguments", "build_parser", "main", "run_command"]

EXIT_INTERNAL_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_EVALUATION_FAILED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


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
    x.add_argument("--op-style", choices=("fused", "qdq"), default="fused",
                   help="fused (default): laid out for onnxruntime's int8 kernels; qdq: plain "
                        "QuantizeLinear/DequantizeLinear pairs")
    x.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="shape of one input sample, for models that do not state it (plain PyTorch models)")
    x.add_argument("--recipe", default=None,
                   help="recipe that builds the float skeleton of a plain PyTorch checkpoint (default: "
                        "CHECKPOINT/recipe.yaml)")
    return parser


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
