"""The import layers point one way only, and no module grows past ~300 lines without saying why.

    core <- data <- training <- stages (config, cli, report, the API)
    core <- methods <- training
    core <- exporters <- stages

Checked two ways: statically (every import statement of every module, lazy ones inside
functions included) and at run time (what importing a layer loads into a fresh interpreter).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "exporters")
LAYERS = ("core", "data", "methods", "training", "exporters", "top")
ALLOWED = {
    "core": {"core"},
    "data": {"core", "data"},
    "methods": {"core", "methods"},
    "training": {"core", "data", "methods", "training"},
    "exporters": {"core", "exporters"},
    "top": set(LAYERS),
}
MAX_LINES = 300


def layer_of(module: str) -> str | None:
    """The layer of a taskfold module name; None for the bare ``pipeline`` package (its version)."""
    parts = module.split(".")
    if parts[0] == "exporters":
        return "exporters"
    if parts[0] != "pipeline":
        return None
    if len(parts) == 1:
        return None
    return parts[1] if parts[1] in ("core", "data", "methods", "training") else "top"


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imported(path: Path, module: str) -> set[str]:
    """Every taskfold module ``path`` imports, at any depth of the file."""
    out = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
    return {m for m in out if m.split(".")[0] in PACKAGES}


def test_every_module_belongs_to_a_layer():
    assert all(layer_of(m) in LAYERS or m == "pipeline" for m in modules())


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_point_down_only(module):
    path = modules()[module]
    mine = layer_of(module)
    if mine is None:
        return
    bad = sorted(m for m in imported(path, module) if (lay := layer_of(m)) is not None and lay not in ALLOWED[mine])
    assert not bad, f"{module} ({mine}) imports {bad}, above its layer"


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _import_all(prefix: str) -> str:
    names = [m for m in modules() if m == prefix or m.startswith(prefix + ".")]
    return "\n".join(f"import {m}" for m in names)


@pytest.mark.parametrize("layer, forbidden", [
    ("exporters", ("pipeline.methods", "pipeline.training", "pipeline.stages", "pipeline.data", "pipeline.config")),
    ("pipeline.core", ("pipeline.methods", "pipeline.training", "pipeline.stages", "pipeline.data", "exporters")),
    ("pipeline.methods", ("pipeline.training", "pipeline.stages", "pipeline.data", "exporters")),
    ("pipeline.training", ("pipeline.stages", "pipeline.config", "exporters")),
])
def test_importing_a_layer_loads_nothing_above_it(layer, forbidden):
    loaded = _loaded_after(_import_all(layer))
    above = [m for m in loaded if m.startswith(forbidden)]
    assert not above, f"importing {layer} loaded {above[:5]}"


def test_no_module_is_long_without_a_reason():
    """A module over MAX_LINES lines says why at its top (a docstring line with 'Longer than')."""
    long = {}
    for module, path in modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES and "Longer than" not in text[:2000]:
            long[module] = text.count("\n")
    assert not long, f"modules over {MAX_LINES} lines without a reason stated at the top: {long}"
