"""Recipes: YAML files naming a model, calibration data, an evaluation and ``AdaQuantConfig`` fields."""

from .build import BuiltModel as BuiltModel
from .build import build_calibration as build_calibration
from .build import build_model as build_model
from .evaluate import Evaluator as Evaluator
from .evaluate import build_evaluator as build_evaluator
from .loading import apply_overrides as apply_overrides
from .loading import load_recipe as load_recipe
from .schema import Recipe as Recipe
from .schema import RecipeError as RecipeError
from .schema import parse_recipe as parse_recipe
from .schema import resolve_path as resolve_path

__all__ = [
    "BuiltModel",
    "Evaluator",
    "Recipe",
    "RecipeError",
    "apply_overrides",
    "build_calibration",
    "build_evaluator",
    "build_model",
    "load_recipe",
    "parse_recipe",
    "resolve_path",
]
