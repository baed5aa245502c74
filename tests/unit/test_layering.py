"""Imports point only from entry packages into the core; the core never imports gradio or accelerate."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

FORBIDDEN = {"gradio", "gradio_client", "accelerate", "app", "indexer", "train_contrastive", "ray", "tests"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_sources_do_not_import_entry_packages_or_frameworks():
    offenders = {
        str(p.relative_to(REPO)): sorted(_imported_roots(p) & FORBIDDEN)
        for p in (REPO / "vitrine").rglob("*.py")
        if _imported_roots(p) & FORBIDDEN
    }
    assert offenders == {}


def test_importing_the_whole_core_loads_no_framework():
    modules = sorted(
        ".".join(p.relative_to(REPO / "vitrine").with_suffix("").parts).removesuffix(".__init__")
        for p in (REPO / "vitrine").rglob("*.py")
    )
    code = (
        "import sys\n"
        + "".join(f"import vitrine.{m}\n" for m in modules if m != "__init__")
        + f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_entry_point_has_main_with_argv():
    for package in ("indexer", "app", "train_contrastive"):
        main_file = REPO / package / "__main__.py"
        if not main_file.exists():
            continue
        tree = (
            ast.parse((REPO / package / "cli.py").read_text())
            if (REPO / package / "cli.py").exists()
            else None
        )
        if tree is None:
            continue
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert mains and mains[0].args.args[0].arg == "argv", package


def _private_imports(path: Path) -> list[str]:
    """``from package.module import _name`` lines: one module reaching into another's internals."""
    return [
        f"{node.module}.{alias.name}"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.ImportFrom) and node.module
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]


def test_no_module_imports_another_modules_private_names():
    offenders = {
        str(p.relative_to(REPO)): _private_imports(p)
        for package in ("vitrine", "indexer", "app", "train_contrastive")
        for p in (REPO / package).rglob("*.py")
        if _private_imports(p)
    }
    assert offenders == {}


def test_the_public_api_is_importable_from_the_package_without_loading_torch():
    code = (
        "import sys, vitrine\n"
        "assert 'torch' not in sys.modules\n"
        "names = [n for n in vitrine.__all__ if n != '__version__']\n"
        "assert all(callable(getattr(vitrine, n)) for n in names)\n"
        "print(sorted(names))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "open_searcher" in out.stdout and "Encoder" in out.stdout
