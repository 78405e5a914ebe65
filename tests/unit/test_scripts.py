"""scripts/setup.sh: the .env it creates holds a new key, and the key is on no command line."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from pii.masking import decode_key

ROOT = Path(__file__).resolve().parents[2]
# External commands a shell step could hand the key to; each is replaced by a spy that logs its
# arguments (what `ps` would show) and then runs the real command.
SPIED = ("sed", "awk", "perl", "tee", "cat", "cp", "install", "env", "python", "python3", "mv")


def env_creation_step() -> str:
    """The block of setup.sh that creates .env."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    match = re.search(r"^if \[ ! -f \.env \]; then\n.*?^fi\n", text, re.S | re.M)
    assert match, "setup.sh no longer has its `if [ ! -f .env ]` block"
    return match.group(0)


def test_setup_creates_env_with_a_new_key_that_no_command_line_shows(tmp_path: Path) -> None:
    # GIVEN a checkout without .env (links to the real files) and spies in front of PATH
    work = tmp_path / "checkout"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".env", ".git", ".stack"):
            (work / entry.name).symlink_to(entry)
    spies = tmp_path / "spies"
    spies.mkdir()
    log = tmp_path / "argv.log"
    path = os.environ.get("PATH", "")
    for name in SPIED:
        real = sys.executable if name.startswith("python") else None
        spy = spies / name
        target = f'"{real}"' if real else f'"$(PATH="{path}" command -v {name})"'
        spy.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{log}"\nexec {target} "$@"\n')
        spy.chmod(0o755)
    # WHEN the step runs
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + env_creation_step()],
        cwd=work,
        env={**os.environ, "PATH": f"{spies}{os.pathsep}{path}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # THEN .env is private and holds a valid key, which no spied command line carried
    env = work / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    [key] = [line.split("=", 1)[1] for line in env.read_text().splitlines() if line.startswith("MASKING_KEY=")]
    assert len(decode_key(key)) == 64
    argv = log.read_text() if log.exists() else ""
    assert key not in argv
    # AND a database of this checkout's own: the example's, renamed after the checkout's path
    [url] = [line.split("=", 1)[1] for line in env.read_text().splitlines() if line.startswith("DATABASE_URL=")]
    database = url.rsplit("/", 1)[1]
    assert re.fullmatch(r"login_etl_[0-9a-f]{8}", database)
    expected = (ROOT / ".env.example").read_text().replace("5432/postgres\n", f"5432/{database}\n")
    assert env.read_text().replace(key, "") == expected
