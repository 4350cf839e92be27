"""The folder layout is the dependency direction (docs/architecture.md): the engine never imports
model presets, experiments, the views or the CLI at module level; presets never import
experiments, the views or the CLI. Checked on every module's top-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tl_degeneracy"

FORBIDDEN = {
    "engine": ("tl_degeneracy.models", "tl_degeneracy.experiments", "tl_degeneracy.viz",
               "tl_degeneracy.cli"),
    "models": ("tl_degeneracy.experiments", "tl_degeneracy.viz", "tl_degeneracy.cli"),
    "viz": ("tl_degeneracy.experiments", "tl_degeneracy.cli", "tl_degeneracy.models"),
}  # fmt: skip


def top_level_imports(path: Path) -> list[str]:
    """Modules imported at module level (not inside functions; `TYPE_CHECKING` blocks count
    as type-only and are skipped)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []:
            if isinstance(sub, ast.Import):
                names += [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                names.append(sub.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_against_the_flow(layer):
    offences = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in top_level_imports(path):
            if name.startswith(FORBIDDEN[layer]):
                offences.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not offences, "\n".join(offences)


def test_the_checker_sees_imports():
    assert "tl_degeneracy.engine.sites" in top_level_imports(PACKAGE / "engine" / "sections.py")
