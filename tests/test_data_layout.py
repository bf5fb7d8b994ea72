"""data/ reads as its parts: an import-free package and a docstring on every module that says its job. (What
data/ may import, and the absence of import cycles, are the layering contracts: tests/test_architecture.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(DATA.rglob("*.py"))}


def imported(name: str) -> set[str]:
    """Absolute names of the modules `name` imports (a `from pkg import sub` names pkg.sub when it is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):  # in functions too: a lazy import hides a cycle, not ends it
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        subs = {f"{origin}.{alias.name}" for alias in node.names} & set(MODULES)
        out.update(subs or {origin})
        if node.module:  # `from .x import y` imports x even when y is a submodule of it
            out.add(origin)
    return out


def test_the_data_package_imports_nothing_and_every_module_says_its_job():
    init = ast.parse((DATA / "__init__.py").read_text())
    assert len(init.body) == 1 and ast.get_docstring(init), "data/__init__.py is a docstring only"
    for name, path in MODULES.items():
        assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring"
