"""The GPU-machine scripts in scripts/ only run where there is a GPU, so CI would not notice when a
refactor renames something they use: check that every flashdecode name they import, and every
attribute they read from an imported flashdecode module, exists."""

from __future__ import annotations

import ast
import importlib
import types
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def flashdecode_uses(tree: ast.AST) -> tuple[list[tuple[str, str]], dict[str, str], list[tuple[str, str, int]]]:
    """(module, name) pairs imported from flashdecode, the local names bound to them, and the
    (local name, attribute, line) of every attribute read on such a local name."""
    imported, bound = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flashdecode":
            for alias in node.names:
                imported.append((node.module, alias.name))
                bound[alias.asname or alias.name] = f"{node.module}:{alias.name}"
    reads = [(node.value.id, node.attr, node.lineno) for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound]
    return imported, bound, reads


def imported_name(module: str, name: str, script: str):
    """What ``from module import name`` gives: an attribute, or else a submodule."""
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return getattr(mod, name)
    try:
        return importlib.import_module(f"{module}.{name}")
    except ModuleNotFoundError:
        raise AssertionError(f"{script}: {module} has no {name!r}") from None


def test_the_scripts_are_found():
    assert {"sweep_splits.py", "gpu_engine_check.py", "tune_decode.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_uses_only_names_that_exist(script):
    imported, bound, reads = flashdecode_uses(ast.parse(script.read_text(), filename=str(script)))
    objects = {}
    for module, name in imported:
        objects[f"{module}:{name}"] = imported_name(module, name, script.name)
    # Also the attributes a script monkeypatches: it saves the original first, so they must exist.
    missing = [f"line {line}: {local}.{attr}" for local, attr, line in reads
               if isinstance(objects[bound[local]], types.ModuleType) and not hasattr(objects[bound[local]], attr)]
    assert not missing, f"{script.name} reads names its flashdecode modules lack: {missing}"
