"""Reading the application's own source, for the tests that check files against it: which
environment variables it reads, which of its modules a start module needs. Shared by the unit and
the integration tests (no test module imports another)."""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The modules of the command line: the ones that read the environment besides the libraries' explicit arguments.
CLI_MODULES = ("config.py", "main.py", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cli").glob("*.py")))


def names_read_from_env(modules: Sequence[str] = CLI_MODULES) -> set[str]:
    """Every NAME in `env.get("NAME")` / `env["NAME"]` / `os.environ...("NAME")` in the app's modules."""
    names: set[str] = set()
    for path in [ROOT / module for module in modules]:
        for node in ast.walk(ast.parse(path.read_text())):
            key = None
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                key = node.args[0].value
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                key = node.slice.value
            if isinstance(key, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", key):
                names.add(key)
    return names


def first_party_imports(start: Path) -> set[str]:
    """Every top-level module or package of ours that `start` needs (itself included), followed
    through imports."""
    top_level = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    needed: set[str] = {start.stem}
    pending = [start]
    while pending:
        for node in ast.walk(ast.parse(pending.pop().read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level
                else []
            )
            for first in {name.split(".")[0] for name in names} & top_level - needed:
                needed.add(first)
                module = ROOT / f"{first}.py"
                pending += [module] if module.exists() else list((ROOT / first).rglob("*.py"))
    return needed
