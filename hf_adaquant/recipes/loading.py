"""Read a recipe: from a file or a shipped recipe name, with ``section.key=value`` overrides, then validated by
:func:`hf_adaquant.recipes.schema.parse_recipe`."""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..utils.mapping_files import read_mapping
from .schema import Recipe, RecipeError, parse_recipe

__all__ = ["apply_overrides", "load_recipe", "shipped_recipes"]


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a copy of a raw recipe."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} must look like section.key=value")
        *parents, leaf = key.strip().split(".")
        node = raw
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
            node = child
        try:
            node[leaf] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: value is not valid YAML ({err})") from None
    return raw


# The recipes that ship with the package (package data, so a wheel has them); the repository's ``recipes/`` is a
# link to this folder, so ``recipes/<name>.yaml`` paths keep working in a checkout.
_SHIPPED = "shipped"


def _shipped_folder() -> importlib.resources.abc.Traversable:
    return importlib.resources.files(__package__).joinpath(_SHIPPED)


def shipped_recipes() -> list[str]:
    """Names of the recipes shipped with the package (what :func:`load_recipe` accepts as a bare name)."""
    return sorted(p.name[: -len(".yaml")] for p in _shipped_folder().iterdir() if p.name.endswith(".yaml"))


def load_recipe(path: str | Path, overrides: Sequence[str] = (), *, check_files: bool = True) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: a ``.yaml`` file, or the name of a recipe shipped with the package (:func:`shipped_recipes`; e.g.
            ``"cifar10-resnet20-w4a4"``). An existing file wins over a shipped recipe of the same name.
        overrides: ``section.key=value`` strings (the CLI's ``--set``).
        check_files: require local files named by the recipe to exist.

    Example:
        >>> recipe = load_recipe("recipes/cifar10-resnet20-w4a4.yaml", ["quantization.iterations=50"])
        >>> recipe = load_recipe("cifar10-resnet20-w4a4")  # the same, shipped with the package
    """
    file = Path(path).expanduser()
    if not file.is_file():
        shipped = _shipped_folder().joinpath(f"{path}.yaml")
        if file.suffix or file.name != str(path) or not shipped.is_file():
            raise RecipeError(f"recipe file not found: {file} (shipped recipes: {', '.join(shipped_recipes())})")
        with importlib.resources.as_file(shipped) as shipped_path:  # a real file even from a zipped install
            return _load_file(Path(shipped_path), overrides, check_files)
    return _load_file(file, overrides, check_files)


def _load_file(file: Path, overrides: Sequence[str], check_files: bool) -> Recipe:
    raw = read_mapping(file, "yaml", what="a recipe", error=RecipeError)
    return parse_recipe(apply_overrides(raw, overrides), path=file.resolve(), check_files=check_files)
