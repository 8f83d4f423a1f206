"""The architecture holds: the import layers (``lint-imports``) and short functions.

The layers are declared in ``pyproject.toml`` ([tool.importlinter]); ``make test``
runs ``lint-imports`` before pytest, and this test runs it again so a plain
``pytest`` catches an upward import or a cycle too.
"""
from __future__ import annotations

import ast
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 40  # the project's rule: a function fits on one screen


def long_functions(folder: Path) -> list[str]:
    """'path:line name (n lines)' for every function longer than MAX_LINES, def to last line."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


@pytest.mark.parametrize("package", ["kdablate", "analysis"])
def test_no_function_is_longer_than_40_lines(package):
    assert long_functions(ROOT / package) == []


def test_the_length_check_sees_a_long_function(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n")
    assert long_functions(tmp_path) == [f"m.py:1 f ({MAX_LINES + 1} lines)"]


def lint_imports() -> str:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists() and shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    cmd = [str(exe) if exe.exists() else "lint-imports", "--no-cache"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return done.stdout


def test_import_layers_hold_and_there_is_no_cycle():
    out = lint_imports()
    assert "0 broken" in out and "kdablate is layered KEPT" in out


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The contract is not vacuous: a copy of the package in which the registry (the bottom
    layer) imports the trainer fails lint-imports."""
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    for name in ("kdablate", "analysis"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    registry = tmp_path / "kdablate" / "registry.py"
    registry.write_text(registry.read_text() + "\nimport kdablate.trainer  # noqa: E402,F401\n")
    done = subprocess.run([str(exe), "--no-cache"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "kdablate is layered BROKEN" in done.stdout


def test_a_knowledge_setting_is_declared_once():
    """KnowledgeConfig's fields are the one list: an arm's fields, the 'set' shortcuts and the
    override keys derive from it; the objectives' typed view (a lower layer, which cannot import
    the config) names the same fields, so a new setting missing there fails here."""
    from kdablate.config import ArmConfig, KnowledgeConfig
    from kdablate.objectives import KnowledgeLike
    from kdablate.study import KNOWLEDGE_KEYS

    fields = list(KnowledgeConfig.model_fields)
    assert KNOWLEDGE_KEYS == tuple(fields) and list(ArmConfig.model_fields)[: len(fields)] == fields
    assert list(KnowledgeLike.__annotations__) == fields


def test_no_name_is_undefined():
    """pyflakes over the product and the tests: a name that is not defined fails only when its line
    runs, and a branch for hardware this machine lacks (CUDA) never runs in the suite."""
    from pyflakes import api, messages
    from pyflakes.reporter import Reporter

    class Collect(Reporter):
        def __init__(self) -> None:
            super().__init__(io.StringIO(), io.StringIO())
            self.found: list[str] = []

        def flake(self, message: object) -> None:
            if isinstance(message, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
                self.found.append(str(message))

    report = Collect()
    api.checkRecursive([str(ROOT / d) for d in ("kdablate", "analysis", "tests")], report)
    assert report.found == []
