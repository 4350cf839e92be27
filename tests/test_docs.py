"""The documentation site builds with `mkdocs build --strict`: every page in the nav exists,
every link and anchor resolves, and every docstring renders without a warning."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=590,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert "WARNING" not in log, log[-4000:]
    site = tmp_path / "site"
    for page in ("index.html", "concepts/index.html", "api/index.html", "cli/index.html"):
        assert (site / page).is_file(), page
    cli = (site / "cli" / "index.html").read_text()
    assert "usage: tl-degeneracy" in cli and "cli-help" not in cli
    api = (site / "api" / "index.html").read_text()
    assert 'id="tl_degeneracy.engine.attribution.comparison.compare_attribution"' in api
    assert not (site / "_hooks").exists()


def test_architecture_lists_every_engine_module():
    """docs/architecture.md's module map names every module and package of the engine."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "architecture.md").read_text()
    engine = root / "tl_degeneracy" / "engine"
    names = [p.stem for p in engine.glob("*.py") if not p.stem.startswith("_")]
    names += [f"{p.name}/" for p in engine.iterdir() if (p / "__init__.py").is_file()]
    missing = [n for n in names if f"| `{n}` |" not in text]
    assert not missing, f"docs/architecture.md does not describe {missing}"


def _code_blocks(*languages: str) -> list[tuple[str, int, str]]:
    """(file, first line, code) of every fenced block in `languages` of the README and docs."""
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text(encoding="utf-8").splitlines()
        opened: tuple[str, int] | None = None
        body: list[str] = []
        for number, line in enumerate(lines, start=1):
            fence = line.strip()
            if not fence.startswith("```"):
                body.append(line)
            elif opened is None:
                opened, body = (fence[3:].strip(), number), []
            else:
                if opened[0] in languages:
                    blocks.append((path.name, opened[1], "\n".join(body)))
                opened = None
    return blocks


def test_every_python_block_of_the_docs_parses_and_imports_what_exists():
    """Each ```python block of the README and docs is valid Python, and every name it imports
    from the package exists where it says (a renamed or moved function breaks the docs)."""
    import ast
    import importlib

    blocks = _code_blocks("python", "py")
    assert len(blocks) > 30
    wrong = []
    for name, line, code in blocks:
        try:
            tree = ast.parse(code)
        except SyntaxError as error:
            wrong.append(f"{name}:{line}: {error}")
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tl_degeneracy"):
                module = importlib.import_module(str(node.module))
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        wrong.append(f"{name}:{line}: {node.module} has no {alias.name}")
    assert not wrong, "\n".join(wrong)


def test_every_command_line_of_the_docs_uses_flags_the_command_has():
    """Each `tl-degeneracy COMMAND --flag` in a shell block of the README and docs names a
    command and flags the parser has."""
    import shlex

    from tl_degeneracy.cli import build_parser

    commands = next(a.choices for a in build_parser()._actions if isinstance(a.choices, dict))
    wrong, seen = [], 0
    for name, line, code in _code_blocks("bash", "sh", "shell", "console"):
        for command in code.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if "tl-degeneracy" not in words:
                continue
            words = words[words.index("tl-degeneracy") + 1 :]
            if not words or words[0].startswith("-"):
                continue
            if words[0] not in commands:
                wrong.append(f"{name}:{line}: no command {words[0]!r}")
                continue
            flags = {o for a in commands[words[0]]._actions for o in a.option_strings}
            for word in words[1:]:
                if word in ("|", "&&", ";", ">", "2>&1"):
                    break
                if word.startswith("--"):
                    seen += 1
                    if word.split("=")[0] not in flags:
                        wrong.append(f"{name}:{line}: {words[0]} has no {word}")
    assert seen > 20 and not wrong, "\n".join(wrong)
