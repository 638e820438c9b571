"""DESIGN.md's layering, enforced on the source with ``ast`` (no module is imported).

- ``facetrain.data`` and ``facetrain.align`` never import ``facetrain.models`` / ``heads`` / ``engine``;
- ``facetrain.models`` and ``facetrain.heads`` never import ``facetrain.engine``;
- only ``facetrain.cli`` and ``facetrain.engine`` import ``facetrain.config`` (everything else takes keyword arguments).

Every import counts: top-level, inside functions, under ``if TYPE_CHECKING``, relative (``from ..models import x``),
``from facetrain import models`` and ``importlib.import_module("facetrain.models")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "src" / "facetrain"

# (importing packages, forbidden packages, why)
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (
        ("facetrain.data", "facetrain.align"),
        ("facetrain.models", "facetrain.heads", "facetrain.engine"),
        "data/align must not depend on models, heads or engine",
    ),
    (("facetrain.models", "facetrain.heads"), ("facetrain.engine",), "models/heads must not depend on engine"),
]
CONFIG_READERS = ("facetrain.cli", "facetrain.engine", "facetrain.config")


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of ``path`` inside the package rooted at ``root`` (``root.name`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root.name, *parts])


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """``(line, absolute dotted name)`` of everything ``path`` imports (``from a import b`` yields ``a.b``)."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and _is_import_module_call(node):
            found.append((node.lineno, node.args[0].value))
    return found


def _is_import_module_call(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return (
        name in ("import_module", "__import__")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def layering_violations(root: Path) -> list[str]:
    """Every import under ``root`` that breaks a rule, as ``file:line: module imports target (why)``."""
    violations: dict[tuple[str, int, str], str] = {}  # first offending name per (file, line, rule)
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        file = str(path.relative_to(root.parent))
        for line, target in imported_modules(path, root):
            broken = [
                why for importers, forbidden, why in RULES if _within(module, importers) and _within(target, forbidden)
            ]
            if _within(target, ("facetrain.config",)) and not _within(module, CONFIG_READERS):
                broken.append("only cli and engine read the config; pass keyword arguments instead")
            for why in broken:
                violations.setdefault((file, line, why), f"{file}:{line}: {module} imports {target} ({why})")
    return sorted(violations.values())


def test_source_tree_respects_layering():
    assert PACKAGE_ROOT.is_dir()
    violations = layering_violations(PACKAGE_ROOT)
    assert not violations, "layering violations (see DESIGN.md):\n" + "\n".join(violations)


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_package(tmp_path: Path) -> Path:
    root = tmp_path / "facetrain"
    for package in ("", "data", "align", "models", "heads", "engine", "cli", "eval"):
        _write(root, f"{package}/__init__.py" if package else "__init__.py", "")
    _write(root, "config.py", "import yaml\n")
    return root


def test_checker_catches_every_import_form(fake_package):
    _write(fake_package, "data/loader.py", "from ..models import build_backbone\n")
    _write(fake_package, "data/__init__.py", "from .loader import x\nfrom . import helpers\n")  # allowed
    _write(fake_package, "align/pipeline.py", "def f():\n    import facetrain.engine.trainer\n")
    _write(fake_package, "models/iresnet.py", "from facetrain import engine\n")
    _write(
        fake_package,
        "heads/margins.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from facetrain.config import LossConfig\n",
    )
    _write(fake_package, "eval/run.py", "import importlib\nm = importlib.import_module('facetrain.config')\n")
    _write(fake_package, "engine/trainer.py", "from facetrain.config import Config\nfrom ..models import registry\n")
    _write(fake_package, "cli/train.py", "from facetrain.config import load_config\n")
    found = "\n".join(layering_violations(fake_package))
    assert "facetrain/data/loader.py:1: facetrain.data.loader imports facetrain.models" in found
    assert "facetrain.align.pipeline imports facetrain.engine.trainer" in found
    assert "facetrain.models.iresnet imports facetrain.engine" in found
    assert "facetrain.heads.margins imports facetrain.config" in found
    assert "facetrain.eval.run imports facetrain.config" in found
    assert "facetrain.engine.trainer imports" not in found and "facetrain.cli.train imports" not in found
    assert found.count("facetrain/data/loader.py:1:") == 1  # one line per import statement and rule
    assert "facetrain.data imports" not in found  # relative import inside data/__init__ resolves to facetrain.data


def test_relative_imports_resolve_from_packages_and_modules(fake_package):
    _write(fake_package, "heads/partial_fc.py", "from .margins import build_margin\nfrom .. import config\n")
    names = [name for _, name in imported_modules(fake_package / "heads" / "partial_fc.py", fake_package)]
    assert names == ["facetrain.heads.margins", "facetrain.heads.margins.build_margin", "facetrain", "facetrain.config"]
    _write(fake_package, "heads/__init__.py", "from .margins import build_margin\n")
    names = [name for _, name in imported_modules(fake_package / "heads" / "__init__.py", fake_package)]
    assert names[0] == "facetrain.heads.margins"
