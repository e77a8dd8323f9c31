"""The package's shape: layers without import cycles, methods written against the public API only."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    """`lint-imports` checks the layer contracts in pyproject.toml (no cycles, the report never
    imports the engine); .ci/run runs it too."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("import-linter is not installed (scripts/setup.sh --dev installs it)")
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.parametrize("path", sorted((ROOT / "methods").glob("*.py")), ids=lambda p: p.name)
def test_methods_import_only_the_public_api(path):
    """A method file imports prunebench's public names (``from prunebench import ...``), never its
    internals, so the engine can be rearranged without touching a method."""
    tree = ast.parse(path.read_text())
    internal = [
        node.module for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prunebench.")
    ] + [
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
        for alias in node.names if alias.name.startswith("prunebench.")
    ]
    assert internal == []


def test_public_api_names_resolve():
    import prunebench

    resolved = {name: getattr(prunebench, name) for name in prunebench.__all__}
    assert resolved["PRE_LLM"] is None and resolved["Method"].__name__ == "Method"
    assert all(value is not None for name, value in resolved.items() if name != "PRE_LLM")
    with pytest.raises(AttributeError):
        prunebench.not_a_name  # noqa: B018
