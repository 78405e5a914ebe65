"""Secrets as files (DATABASE_URL_FILE) and no core dumps: what the process keeps out of reach."""

from __future__ import annotations

import resource

import pytest

from cli.exit_codes import EXIT_OK
from config import ConfigError, Settings, database_url_from_env
from main import main
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
    # GIVEN a record of the limits set (the real call is made too, but an earlier main() in this
    # process may already have set it to 0, and no process can raise a hard limit again)
    calls: list[tuple[int, tuple[int, int]]] = []
    real = resource.setrlimit

    def recording(which: int, limits: tuple[int, int]) -> None:
        calls.append((which, limits))
        real(which, limits)

    monkeypatch.setattr(resource, "setrlimit", recording)
    monkeypatch.chdir(tmp_path)
    # WHEN any command runs
    assert main(["keygen"]) == EXIT_OK
    capsys.readouterr()
    # THEN core dumps are off for good (the hard limit too): a core would hold the key and raw values
    assert (resource.RLIMIT_CORE, (0, 0)) in calls
    assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
