"""The linters the README promises, run as tests so that CI keeps the code clean; and the import
rules of the tests themselves."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.static  # mypy takes ~8 s: `make unit` leaves these to `make lint` / `make typecheck`
def test_ruff_finds_nothing_to_fix() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.static
def test_ruff_format_has_nothing_to_change() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.static
def test_mypy_finds_no_type_errors_in_the_app_its_tests_benchmarks_and_scripts() -> None:
    result = _run("mypy")  # files and options from pyproject.toml
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_the_pre_commit_hooks_run_the_pinned_ruff_formatter_and_mypy_from_the_venv() -> None:
    import yaml

    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    assert set(hooks) == {"ruff", "ruff-format", "mypy"}
    pinned = (ROOT / "requirements-dev.txt").read_text()
    for hook in hooks.values():
        tool = hook["entry"].split()[0]
        assert tool.startswith(".venv/bin/") and f"{tool.removeprefix('.venv/bin/')}==" in pinned, hook
    assert hooks["ruff-format"]["entry"].split()[1] == "format" and hooks["mypy"]["pass_filenames"] is False


def _imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every absolute import in a Python file; `from a import b` gives a.b too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def test_no_unit_test_imports_an_integration_test_module() -> None:
    # Shared samples and fakes live in tests/fakes.py (docs/CONTRIBUTING.md): a unit test that needs
    # tests/integration/ on the path, or its helpers, is not a unit test.
    integration = {path.stem for path in (ROOT / "tests" / "integration").glob("*.py")}
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in sorted((ROOT / "tests" / "unit").rglob("*.py"))
        for line, name in _imported_modules(path)
        if name.split(".")[0] in integration or name == "tests.integration" or name.startswith("tests.integration.")
    ]
    assert offenders == [], "unit tests importing from tests/integration/ (use tests/fakes.py): " + str(offenders)


def test_no_test_module_imports_another() -> None:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for _line, name in _imported_modules(path):
            if name.rsplit(".", 1)[-1].startswith("test_"):
                found.setdefault(str(path.relative_to(ROOT)), set()).add(name)
    assert found == {}, "share helpers through tests/fakes.py or tests/integration/helpers.py"


def test_the_app_connects_to_postgresql_only_through_open_connection() -> None:
    """database.connection.open_connection gives every session its TCP keepalives and
    tcp_user_timeout (tests/integration/test_half_open.py); a psycopg2.connect elsewhere in the app
    (rekey, replay, retention and the unmask audit had their own) would wait ~15 min on a half-open
    connection."""
    app = [*ROOT.glob("*.py"), *(p for package in ("aws", "database", "pii") for p in (ROOT / package).rglob("*.py"))]
    calls = []
    for path in sorted(app):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                for call in ast.walk(node):
                    if (
                        isinstance(call, ast.Call)
                        and isinstance(call.func, ast.Attribute)
                        and call.func.attr == "connect"
                        and isinstance(call.func.value, ast.Name)
                        and call.func.value.id == "psycopg2"
                    ):
                        calls.append(f"{path.relative_to(ROOT)}:{call.lineno} in {node.name}()")
    assert [c for c in calls if not c.startswith("database/connection.py:") or "open_connection" not in c] == []
    assert len(calls) == 1, calls


def test_every_postgresql_session_of_the_app_is_named_login_etl_something() -> None:
    """The documented `application_name LIKE 'login-etl%'` (docs/kubernetes.md, docs/lambda.md) finds
    every connection of ours only if every name the code gives starts so: keyword arguments and
    parameter defaults named application_name, in the app's modules."""
    names: dict[str, str] = {}
    for path in [*ROOT.glob("*.py"), *(ROOT / "database").glob("*.py"), *(ROOT / "aws").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            values: list[ast.expr] = []
            if isinstance(node, ast.Call):
                values = [k.value for k in node.keywords if k.arg == "application_name"]
            elif isinstance(node, ast.arguments):
                named = node.args[len(node.args) - len(node.defaults) :] + node.kwonlyargs
                defaults = [*node.defaults, *node.kw_defaults]
                values = [d for a, d in zip(named, defaults, strict=True) if a.arg == "application_name" and d]
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    names[f"{path.name}:{value.lineno}"] = value.value
    assert len(names) >= 10, names  # the writer, the indexer, the Lambda, the one-shot commands
    assert {where: name for where, name in names.items() if not name.startswith("login-etl")} == {}
