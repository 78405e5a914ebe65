"""The roles of database/roles.sql for integration tests: applying the file, a login per role, and
the auditors' query as the docs give it. The `logins` fixture is in this folder's conftest.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from urllib.parse import urlsplit, urlunsplit

import pytest

from helpers import ROOT

GROUPS = ("etl", "analyst", "unmask", "auditor")


def as_user(dsn: str, user: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:pw-{user}@{host}"))


def apply_roles_sql(admin_dsn: str, roles: dict[str, str]) -> str:
    psql = shutil.which("psql")
    if psql is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("psql is required under CI=true")
        pytest.skip("psql is not available")
    options = [arg for group, role in roles.items() for arg in ("-v", f"{group}_role={role}")]
    result = subprocess.run(
        [psql, admin_dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1", *options, "-f", str(ROOT / "database" / "roles.sql")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def readme_auditor_query() -> str:
    """The SQL the docs give auditors (the block after "finds the rows behind an entry")."""
    text = (ROOT / "docs" / "keys-and-privacy.md").read_text(encoding="utf-8")
    after = text[text.index("finds the rows behind an entry") :]
    return after[after.index("```sql") + len("```sql") : after.index("```", after.index("```sql") + 6)].strip()
