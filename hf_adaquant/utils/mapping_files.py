"""Read a small JSON or YAML file that must hold a mapping (a recipe, a checkpoint's side-car), with one error
wording for "does not parse" and "is not a mapping" wherever the library reads one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = ["read_mapping"]


def read_mapping(path: Path, fmt: Literal["json", "yaml"], *, what: str = "the file",
                 error: type[Exception] = ValueError) -> dict[str, Any]:
    """Parse ``path`` as ``fmt`` and return the mapping it holds.

    Args:
        path: the file to read (text).
        fmt: ``"json"`` (must hold an object) or ``"yaml"`` (must hold a mapping).
        what: how the "not a mapping" message names the content (e.g. ``"a recipe"``).
        error: the exception type raised (a caller's own ``ValueError`` subclass, e.g. ``RecipeError``).

    Raises:
        error: ``"<path>: not valid JSON: ..."`` when it does not parse, ``"<path>: <what> must be a JSON object"``
            (YAML: ``a YAML mapping``) when it parses to something else.
    """
    if fmt == "json":
        name, container, parse, parse_errors = "JSON", "object", json.loads, (json.JSONDecodeError,)
    elif fmt == "yaml":
        name, container, parse, parse_errors = "YAML", "mapping", yaml.safe_load, (yaml.YAMLError,)
    else:
        raise ValueError(f"fmt must be 'json' or 'yaml', got {fmt!r}")
    try:
        data = parse(path.read_text())
    except parse_errors as err:
        # The parser's message (line, column) is in ours; chaining it would only repeat it in a traceback.
        raise error(f"{path}: not valid {name}: {err}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a {name} {container}")
    return data
