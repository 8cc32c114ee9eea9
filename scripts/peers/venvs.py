"""Private virtual environments for the peer libraries (AIMET, Brevitas).

Their torch pins differ from ours, so each peer gets its own venv. Creation is idempotent: a marker file
records the requirement list that was installed, and a venv whose marker matches is reused untouched.
Imports only the standard library (the driver runs in our venv, the workers in the peers').
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

__all__ = ["PEER_REQUIREMENTS", "TORCH_REQUIREMENTS", "ensure_venv", "venv_python"]

TORCH_REQUIREMENTS: tuple[str, ...] = ("torch==2.14.1", "torchvision==0.29.1")
"""Same torch as ours, so the FP model, data and kernels are identical across runs."""

PEER_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    # aimet-torch 2.42 resolves against torch 2.14.1 (pip --dry-run).
    "aimet": ("aimet-torch",),
    # accelerate: brevitas_examples' learned-round utilities import it; brevitas does not depend on it.
    "brevitas": ("brevitas", "accelerate"),
}
MARKER = "hf_adaquant_peer_installed.json"


def venv_python(folder: Path) -> Path:
    """The interpreter of the venv at ``folder``."""
    return folder / "bin" / "python"


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_venv(peer: str, folder: Path) -> Path:
    """Create ``folder`` as a venv with torch and ``peer`` installed, unless its marker says it is done.

    Args:
        peer: A key of ``PEER_REQUIREMENTS``.
        folder: Where the venv lives (e.g. ``work/peers/venv-aimet``).

    Returns:
        The venv's python.

    Raises:
        ValueError: On an unknown peer.
        subprocess.CalledProcessError: When pip fails (the marker is then not written, so a rerun retries).
    """
    if peer not in PEER_REQUIREMENTS:
        raise ValueError(f"unknown peer {peer!r}; accepted: {sorted(PEER_REQUIREMENTS)}")
    requirements = [*TORCH_REQUIREMENTS, *PEER_REQUIREMENTS[peer]]
    python = venv_python(folder)
    marker = folder / MARKER
    if python.exists() and marker.exists():
        try:
            done = json.loads(marker.read_text()).get("requirements")
        except (OSError, ValueError):
            done = None
        if done == requirements:
            print(f"[{peer}] venv {folder} already installed ({' '.join(requirements)})", flush=True)
            return python
    if not python.exists():
        print(f"[{peer}] creating venv {folder}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(folder)
    print(f"[{peer}] installing {' '.join(requirements)} into {folder}", flush=True)
    # torch first and pinned: the peer's own resolution must then keep it (pip would otherwise pick its newest
    # compatible torch, which may differ from ours).
    _pip(python, *TORCH_REQUIREMENTS)
    _pip(python, *requirements)
    versions = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True, text=True, check=True,
    ).stdout
    installed = {p["name"].lower(): p["version"] for p in json.loads(versions)}
    marker.write_text(json.dumps({"requirements": requirements, "installed": installed}, indent=2))
    print(f"[{peer}] done: torch {installed.get('torch')}, {peer} "
          f"{installed.get(PEER_REQUIREMENTS[peer][0].lower())}", flush=True)
    return python


if __name__ == "__main__":  # python scripts/peers/venvs.py aimet work/peers/venv-aimet
    ensure_venv(sys.argv[1], Path(sys.argv[2]))
