"""Model, data-transform, training-step and render code knows nothing of Ray or DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAIN_FOLDERS = ["rayimg/models", "rayimg/data", "rayimg/train", "rayimg/render"]
FORBIDDEN = ("ray", "deepspeed")


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def plain_files():
    files = [p for folder in PLAIN_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert files, "no library files found"
    return files


@pytest.mark.parametrize("path", plain_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_plain_code_does_not_import_ray_or_deepspeed(path):
    bad = imported_roots(path) & set(FORBIDDEN)
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}; wire Ray/DeepSpeed in rayimg/run, jobs/ or serving/"


def test_importing_plain_packages_loads_no_ray():
    packages = [folder.replace("/", ".") for folder in PLAIN_FOLDERS if (ROOT / folder / "__init__.py").exists()]
    modules = [str(p.relative_to(ROOT).with_suffix("")).replace("/", ".") for p in plain_files() if p.name != "__init__.py"]
    code = (
        "import importlib, sys\n"
        f"for m in {packages + modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_checker_catches_an_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom ray import train\nimport importlib\nimportlib.import_module('deepspeed.ops')\n")
    assert imported_roots(bad) >= {"ray", "deepspeed"}
