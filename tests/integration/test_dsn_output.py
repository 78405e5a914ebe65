"""No command shows the database password, whatever the DSN's shape (PostgreSQL unreachable on :1)."""

from __future__ import annotations

import pytest

from cli.exit_codes import EXIT_UNREACHABLE
from main import main

SECRET = "s3cret-pw"
SHAPES = {
    "uri": f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres",
    "query-parameter": f"postgresql://postgres@127.0.0.1:1/postgres?password={SECRET}",
    "keyword": f"host=127.0.0.1 port=1 user=postgres password={SECRET} dbname=postgres",
}


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["check"],
        ["rekey"],
        ["--log-format", "json", "-v"],
        ["unmask", "--reason", "r", "v1.abc"],
        ["replay", "--reason", "r", "--dry-run"],
        ["retention", "--keep-days", "30", "--dry-run"],
        ["--log-format", "json", "-v", "retention", "--keep-days", "30"],
    ],
)
@pytest.mark.parametrize("dsn", SHAPES.values(), ids=SHAPES.keys())
def test_no_command_shows_the_password_of_an_unreachable_database(
    etl_env, monkeypatch, capsys, dsn: str, command: list[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    assert main(command) == EXIT_UNREACHABLE
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "postgresql://postgres@127.0.0.1:1/postgres" in output  # host, port, database and user
    assert SECRET not in output and "Traceback" not in output
