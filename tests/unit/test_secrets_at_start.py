"""Secrets as files (DATABASE_URL_FILE) and no core dumps: what the process keeps out of reach."""

from __future__ import annotations

import resource

import pytest

from config import ConfigError, Settings, database_url_from_env
from main import EXIT_OK, main
from pii.masking import generate_key

DSN = "postgresql://etl:s3cret@db:5432/logins?sslmode=verify-full"


def test_the_database_url_is_read_from_the_file_database_url_file_names(tmp_path) -> None:
    secret = tmp_path / "url"
    secret.write_text(DSN + "\n")
    env = {"DATABASE_URL_FILE": str(secret), "MASKING_KEY": generate_key()}
    assert database_url_from_env(env) == DSN
    assert Settings.from_env(env).database_url == DSN


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, {}, "cannot read it"),
        ("", {}, "found none or too much"),
        ("x" * 9000, {}, "found none or too much"),
        ("host='unterminated", {}, "not a valid libpq connection string"),
        (DSN, {"DATABASE_URL": DSN}, "set one"),
    ],
)
def test_a_database_url_file_that_cannot_be_used_is_one_line_without_its_content(
    tmp_path, content, extra, message
) -> None:
    secret = tmp_path / "url"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ConfigError, match=message) as raised:
        database_url_from_env({"DATABASE_URL_FILE": str(secret), **extra})
    assert "s3cret" not in str(raised.value) and "\n" not in str(raised.value)


def test_a_run_turns_core_dumps_off_first(monkeypatch, tmp_path, capsys) -> None:
    # GIVEN a process allowed to dump core (a core would hold the key and recent raw values)
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    if hard == 0:
        pytest.skip("core dumps are already off for this process")
    monkeypatch.chdir(tmp_path)
    try:
        # WHEN any command runs
        assert main(["keygen"]) == EXIT_OK
        # THEN core dumps are off for good (the hard limit too)
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
    finally:
        capsys.readouterr()
