"""Layering of the package: every module imports only its own layer or lower ones, and no import cycles.

Imports are read from the source with ``ast`` (module level, inside functions and under ``TYPE_CHECKING`` alike: a
function-level import is still a dependency, and hiding one inside a function is how cycles used to be dodged).
Known exceptions are listed explicitly; the test fails on a new one *and* on a listed one that has disappeared, so
the lists only shrink.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "hf_adaquant"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. A module belongs to the layer of its longest matching prefix (subpackage or top-level module) and may
# import modules of its own layer or of lower layers only.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("utils", ("utils", "version")),
    ("quant", ("quant",)),  # numbers: quantizers, ranges, packing
    # AdaQuantConfig, named policies that build one, the run record: data, no behaviour
    ("config", ("config", "policies", "report")),
    ("nn", ("nn",)),  # quantized modules
    # model preparation; calibrate.py (range initialisation) is a building block of adaquant/ and tuning/ too
    ("prepare", ("prepare", "calibrate")),
    ("distributed", ("distributed",)),  # rank context, work dir, layer schedule used by the AdaQuant runner
    ("optimise", ("adaquant", "tuning")),
    ("allocation", ("allocation",)),
    ("verbs", ("quantize", "sweep", "size")),  # pipeline verbs
    ("serialization", ("serialization",)),
    # benchmark / example support (models, data sets, metrics, tasks): only the outer layer may use it
    ("support", ("models", "data", "metrics", "tasks", "evaluation")),
    ("outer", ("integrations", "hub", "cli", "cli_commands", "export", "recipes", "quantizer")),
    ("api", ("",)),  # hf_adaquant/__init__.py re-exports everything
]

# (importer, imported) edges that break the layering, each with the reason it is still there. Remove an entry
# when its edge goes away (the test says so).
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()

# Import cycles between modules (function-level imports included), as sorted tuples of their modules.
# (adaquant/layerwise.py <-> adaquant/runner.py, quantize.py -> allocation -> quantize.py and
# integrations/transformers.py <-> serialization/checkpoint.py <-> integrations/calibration.py are gone: issue #16.)
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Modules an ``ImportFrom`` node imports (``from .x import y`` -> ``pkg.x.y`` if that is a module, else
    ``pkg.x``)."""
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        return []
    out = []
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        out.append(candidate if candidate in MODULES else target)
    return out


def import_edges() -> dict[tuple[str, str], list[int]]:
    """``{(importer, imported): [line, ...]}`` over every module of the package, all import statements."""
    edges: dict[tuple[str, str], list[int]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
            else:
                continue
            for target in targets:
                while target not in MODULES and "." in target:  # `import pkg.mod.attr` style: nearest module
                    target = target.rpartition(".")[0]
                if target != name:
                    edges.setdefault((name, target), []).append(node.lineno)
    return edges


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of ``module`` (longest matching prefix)."""
    relative = module[len(PACKAGE) + 1:] if module != PACKAGE else ""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = relative == prefix or relative.startswith(prefix + ".") or prefix == ""
            if matches and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None
    return best


def _cycles(edges: set[tuple[str, str]]) -> set[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[tuple[str, ...]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.add(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer() -> None:
    """A new subpackage or top-level module must be placed in LAYERS on purpose (not land in "api" by accident)."""
    api = len(LAYERS) - 1
    unplaced = sorted(m for m in MODULES if m != PACKAGE and layer_of(m) == api)
    assert not unplaced, f"modules without a layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_imports_go_downward_only() -> None:
    edges = import_edges()
    upward = {(a, b) for a, b in edges if layer_of(b) > layer_of(a)}
    new = sorted(upward - KNOWN_VIOLATIONS)
    gone = sorted(KNOWN_VIOLATIONS - upward)
    described = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}) at line(s) {edges[a, b]}"
                 for a, b in new]
    assert not new, "imports into a higher layer:\n" + "\n".join(described)
    assert not gone, f"known violations that no longer occur (remove them from KNOWN_VIOLATIONS): {gone}"


def test_no_import_cycles() -> None:
    """No two modules import each other, directly or through others (function-level imports count). Edges from a
    module to its own parent packages are left out: Python initialises those first whatever the import order."""
    edges = {(a, b) for a, b in import_edges() if not a.startswith(b + ".")}
    cycles = _cycles(edges)
    new = sorted(cycles - KNOWN_CYCLES)
    gone = sorted(KNOWN_CYCLES - cycles)
    assert not new, f"import cycles: {new}"
    assert not gone, f"known cycles that no longer occur (remove them from KNOWN_CYCLES): {gone}"


@pytest.mark.parametrize("source, importer, expected", [
    ("from ..quantize import quantize\n", "hf_adaquant.allocation.pareto", ("hf_adaquant.quantize", "verbs")),
    ("def f():\n    from ..serialization import checkpoint\n", "hf_adaquant.prepare.model",
     ("hf_adaquant.serialization.checkpoint", "serialization")),
])
def test_the_checker_sees_upward_imports(source: str, importer: str, expected: tuple[str, str]) -> None:
    """The edge extraction finds module-level and function-level relative imports and ranks them above the
    importer (so the layering test cannot pass by reading nothing)."""
    tree = ast.parse(source)
    found = [t for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for t in _resolve(importer, False, node)]
    assert found == [expected[0]]
    assert LAYERS[layer_of(found[0])][0] == expected[1]
    assert layer_of(found[0]) > layer_of(importer)


def test_public_names_stay_importable_from_the_package() -> None:
    import hf_adaquant
    from hf_adaquant.prepare import PreparedModel, prepare_model
    from hf_adaquant.quantize import QuantizationReport as FromQuantize
    from hf_adaquant.report import QuantizationReport

    for name in hf_adaquant.__all__:
        assert hasattr(hf_adaquant, name), name
    assert hf_adaquant.prepare_model is prepare_model and hf_adaquant.PreparedModel is PreparedModel
    assert hf_adaquant.QuantizationReport is QuantizationReport is FromQuantize  # old path still works (pickles)
