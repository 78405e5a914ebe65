"""DATABASE_URL: whatever its shape, the password never reaches output; a malformed one exits 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.exit_codes import EXIT_CONFIG
from config import ConfigError, Settings, redact_dsn
from main import main
from pii.masking import generate_key

SECRET = "50%zzS3cret"
KEY = generate_key()


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://u:hunter2@db:5432/x", "postgresql://u@db:5432/x"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("postgresql://u@db/x?password=hunter2&sslmode=require", "postgresql://u@db/x"),
        ("host=db port=5433 user=u password=hunter2 dbname=x", "postgresql://u@db:5433/x"),
        ("host=db user=u password='hunter2 with spaces' dbname=x", "postgresql://u@db/x"),
        ("postgresql://u:hunter2@[::1]:5433/x", "postgresql://u@[::1]:5433/x"),
        ("postgresql://u:hunter2@h1:5432,h2:5433/x", "postgresql://u@h1:5432,h2:5433/x"),
        ("host=/var/run/postgresql user=u password=hunter2", "postgresql://u@%2Fvar%2Frun%2Fpostgresql"),
    ],
)
def test_redact_dsn_shows_host_port_database_and_user_only(dsn: str, shown: str) -> None:
    assert redact_dsn(dsn) == shown
    assert "hunter2" not in redact_dsn(dsn)


@pytest.mark.parametrize(
    "dsn",
    [
        f"postgresql://postgres:{SECRET}@db/x",  # a % that is not an escape
        f"host=db password='{SECRET}",  # an unterminated quote
        f"postgresql://postgres@db/x?passwort={SECRET}",  # a misspelt parameter
    ],
)
def test_an_unparseable_dsn_is_named_not_shown(dsn: str) -> None:
    assert redact_dsn(dsn) == "(unparseable DATABASE_URL)"
    with pytest.raises(ConfigError, match="DATABASE_URL") as info:
        Settings.from_env({"MASKING_KEY": KEY, "DATABASE_URL": dsn})
    assert SECRET not in str(info.value) and "zz" not in str(info.value)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["check"],
        ["rekey"],
        ["unmask", "--reason", "r", "v1.abc"],
        ["replay", "--reason", "r", "--dry-run"],
        ["retention", "--keep-days", "30", "--dry-run"],
        ["snapshot"],
    ],
)
def test_a_malformed_dsn_exits_2_with_one_line_and_no_password(
    command: list[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("MASKING_KEYS", "MASKING_KEY_FILE", "MASKING_KEY_KMS_CIPHERTEXT", "MASKING_KEY_VERSION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASKING_KEY", KEY)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres")
    assert main(command) == EXIT_CONFIG
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert SECRET not in output and "Traceback" not in output
    assert len(output.strip().splitlines()) == 1 and "DATABASE_URL" in output
