"""The suite mirrors the package: tests/<subpackage>/test_<module>.py (issue #16), each folder a package."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "hf_adaquant"
# Root test files that are about the package as a whole rather than one top-level module.
WHOLE_PACKAGE = {"test_architecture.py", "test_layout.py"}
NOT_PACKAGES = {"scripts"}  # tests/scripts/ tests the repository's scripts/, not a subpackage


def _folders() -> list[Path]:
    return sorted(p for p in TESTS.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def test_every_test_folder_mirrors_a_subpackage_and_is_a_package() -> None:
    for folder in _folders():
        assert folder.name in NOT_PACKAGES or (PACKAGE / folder.name / "__init__.py").is_file(), (
            f"tests/{folder.name}/ names no hf_adaquant subpackage")
        assert (folder / "__init__.py").is_file(), f"tests/{folder.name}/ needs an __init__.py (unique module names)"
        assert not [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))], (
            f"tests/{folder.name}/ has nested folders: mirror one level")


def test_root_test_files_test_a_top_level_module() -> None:
    for file in sorted(TESTS.glob("test_*.py")):
        module = file.name[len("test_"):]
        assert file.name in WHOLE_PACKAGE or (PACKAGE / module).is_file(), (
            f"tests/{file.name} tests no top-level module: move it to tests/<subpackage>/")
