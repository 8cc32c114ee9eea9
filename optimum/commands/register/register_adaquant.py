"""``optimum-cli adaquant quantize ...``: hf-adaquant's command registered with optimum's CLI.

optimum-cli imports every module of the namespace package ``optimum.commands.register`` (PEP 420: no
``__init__.py``) and registers the commands listed in its ``REGISTER_COMMANDS``; this file is installed there by
the hf-adaquant distribution (``pyproject.toml`` packages it as the ``optimum.commands.register`` namespace).

optimum-cli builds every registered command's parser on every start (``optimum-cli --help``, ``optimum-cli export
...``), so this module imports nothing of hf_adaquant: importing it loads torch, timm and transformers (seconds).
hf_adaquant is imported only when ``optimum-cli adaquant quantize`` parses its arguments or runs, as optimum asks
of plug-ins ("keep all relevant imports inside the run function").
"""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from pathlib import Path
from typing import Any, Callable, Sequence

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["AdaQuantCommand", "AdaQuantQuantizeCommand", "DeferredArgumentParser", "REGISTER_COMMANDS"]


class DeferredArgumentParser(ArgumentParser):
    """An ``ArgumentParser`` that adds some arguments only when it first parses (or prints help).

    ``optimum-cli`` builds the parser of every plug-in command at start-up; arguments whose definitions live in a
    heavy package are deferred so that only the command that needs them pays for the import.
    """

    _deferred: list[Callable[[ArgumentParser], None]]

    def defer(self, add_arguments: Callable[[ArgumentParser], None]) -> None:
        """Call ``add_arguments(self)`` just before the first parse."""
        if not hasattr(self, "_deferred"):
            self._deferred = []
        self._deferred.append(add_arguments)

    def _add_deferred(self) -> None:
        while getattr(self, "_deferred", None):
            self._deferred.pop(0)(self)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Namespace | None = None) -> Any:
        self._add_deferred()  # argparse's sub-parser action calls this on the chosen sub-command's parser
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._add_deferred()
        return super().format_help()


def _add_model_arguments(parser: ArgumentParser) -> None:
    # Deferred import: hf_adaquant loads torch/timm/transformers; the -m/--model options are hf-adaquant's own.
    from hf_adaquant.cli import add_model_arguments

    add_model_arguments(parser)


class AdaQuantQuantizeCommand(BaseOptimumCLICommand):
    """``optimum-cli adaquant quantize -m MODEL --weights int4 --activations int8 --dataset DATA OUTPUT``."""

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        parser.add_argument("output", type=Path, help="checkpoint folder to write")
        parser.add_argument("--recipe", default=None, help="recipe .yaml file, instead of -m/--model")
        parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a recipe value, e.g. quantization.iterations=50 (repeatable)")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output folder")
        parser.add_argument("--no-eval", action="store_true", help="skip the recipe's evaluation")
        parser.add_argument("--work-dir", type=Path, default=None, help="resumable per-layer work folder")
        parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        if isinstance(parser, DeferredArgumentParser):
            parser.defer(_add_model_arguments)
        else:  # a parser optimum built another way: add them now (a slower start, the same command)
            _add_model_arguments(parser)

    def run(self) -> None:
        # Deferred import, as above: only this command needs hf_adaquant.
        from hf_adaquant.cli import build_parser, run_command

        # Options of `hf-adaquant quantize` this command does not expose keep their defaults there.
        defaults = build_parser().parse_args(["quantize", "--output", str(self.args.output)])
        for name, value in vars(defaults).items():
            if not hasattr(self.args, name):
                setattr(self.args, name, value)
        self.args.command = "quantize"
        status = run_command(self.args)
        if status:
            raise SystemExit(status)


class AdaQuantCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="adaquant", help="AdaQuant post-training quantization (hf-adaquant)")
    SUBCOMMANDS = (CommandInfo(name="quantize", help="quantize a model (-m MODEL --dataset DATA, or --recipe) and "
                                                     "save a checkpoint", subcommand_class=AdaQuantQuantizeCommand),)

    @property
    def subparsers(self) -> Any:
        """The base class's lazily created sub-parsers, made with :class:`DeferredArgumentParser`."""
        if getattr(self, "_subparsers", None) is None:
            self._subparsers = self.parser.add_subparsers(parser_class=DeferredArgumentParser)
        return self._subparsers

    @subparsers.setter
    def subparsers(self, subparsers: Any) -> None:
        self._subparsers = subparsers


REGISTER_COMMANDS = [AdaQuantCommand]
