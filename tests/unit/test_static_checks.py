"""The linters the README promises, run as tests so that CI keeps the code clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing_to_fix() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_has_nothing_to_change() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


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
