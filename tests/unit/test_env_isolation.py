"""`make unit` passes whatever the user's .env holds: a valid keyring, a broken file, or none (the
default of every other unit test). Run in a subprocess from a directory holding such a .env."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pii.masking import generate_key

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "env_text",
    [
        "MASKING_KEYS=1:{k1},2:{k2}\nMASKING_KEY_VERSION=2\n",  # after the documented MASKING_KEYS rotation
        "MASKING_KEY=not-a-key\nDATABASE_URL=postgresql://nobody@256.0.0.1:1/x\n",  # broken
    ],
    ids=["rotated-keyring", "broken"],
)
def test_the_cli_unit_tests_pass_whatever_env_file_the_working_directory_holds(env_text: str, tmp_path: Path) -> None:
    # GIVEN a working directory whose .env holds what a user may have put there
    (tmp_path / ".env").write_text(env_text.format(k1=generate_key(), k2=generate_key()))
    env = {n: v for n, v in os.environ.items() if not n.startswith(("MASKING_KEY", "PYTEST_"))}
    # WHEN the CLI's unit tests run from there
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "-n",
            "0",
            str(ROOT / "tests/unit/test_cli.py"),
        ],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # THEN they pass
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
