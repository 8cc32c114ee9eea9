"""Locate the read-only ``shared/`` folder of real models and data (development machines and CI only)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SHARED_ENV_VAR", "repo_root", "shared_dir"]

SHARED_ENV_VAR = "HF_ADAQUANT_SHARED"
"""Environment variable that overrides where ``shared/`` is looked for."""


def repo_root() -> Path:
    """Return the folder holding the ``hf_adaquant`` package (the repository root in a source checkout)."""
    return Path(__file__).resolve().parents[2]


def shared_dir() -> Path | None:
    """Find the ``shared/`` folder with the offline models and data.

    Looks at ``$HF_ADAQUANT_SHARED`` first, then ``../shared`` next to the repository root, then
    ``../shared`` relative to the working directory.

    Returns:
        The folder, or ``None`` when none exists (tests that need it skip then).
    """
    candidates: list[Path] = []
    env = os.environ.get(SHARED_ENV_VAR)
    if env:
        candidates.append(Path(env).expanduser())
    candidates.append(repo_root().parent / "shared")
    candidates.append(Path.cwd().parent / "shared")
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    return None
