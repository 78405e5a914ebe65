"""Audited unmasking: every call leaves a row in pii_unmask_audit before anything is shown."""

from __future__ import annotations

import subprocess

import pytest

from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNMASK_FAILED, EXIT_UNREACHABLE
from database.audit import token_fingerprint
from helpers import query
from main import main
from pii.masking import Masker, decode_key, generate_key

KEY = generate_key()
MASKER = Masker(decode_key(KEY))
VALUES = {"ip": "198.51.100.99", "device_id": "987-65-4321"}
AUDIT_COLUMNS = "requested_by, reason, token_count, failed_count, token_fingerprints, database_user"


@pytest.fixture
def unmask_env(db_env, monkeypatch):
    """MASKING_KEY and DATABASE_URL only; no .env from the checkout."""
    monkeypatch.setenv("MASKING_KEY", KEY)
    return db_env


def tokens() -> list[str]:
    return [MASKER.mask(field, value) for field, value in VALUES.items()]


def test_an_unmask_is_recorded_with_who_why_and_fingerprints_before_values_are_shown(unmask_env, capsys) -> None:
    ip, device = tokens()
    assert main(["unmask", "--reason", "fraud case 42", "--requested-by", "alice", ip, device]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == [VALUES["ip"], VALUES["device_id"]]
    rows = query(
        unmask_env, f"SELECT {AUDIT_COLUMNS}, requested_at > now() - interval '1 minute' FROM pii_unmask_audit"
    )
    assert rows == [
        ("alice", "fraud case 42", 2, 0, [token_fingerprint(ip), token_fingerprint(device)], "postgres", True)
    ]


def test_the_audit_holds_neither_values_nor_tokens(unmask_env, capsys) -> None:
    assert main(["unmask", "--reason", "dump check", *tokens()]) == EXIT_OK
    schema = query(unmask_env, "SELECT current_schema()")[0][0]
    dump = subprocess.run(
        ["pg_dump", "--data-only", "-t", f"{schema}.pii_unmask_audit", unmask_env.split("?")[0]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dump check" in dump  # the dump really holds the row
    for secret in [*VALUES.values(), *tokens(), KEY]:
        assert secret not in dump


def test_a_failed_unmask_is_audited_too_and_shows_nothing(unmask_env, capsys) -> None:
    foreign = Masker(decode_key(generate_key())).mask("ip", "10.0.0.1")
    assert main(["unmask", "--reason", "typo", tokens()[0], foreign]) == EXIT_UNMASK_FAILED
    captured = capsys.readouterr()
    assert captured.out == "" and "token 2: token does not decrypt" in captured.err
    assert query(unmask_env, "SELECT token_count, failed_count FROM pii_unmask_audit") == [(2, 1)]


@pytest.mark.parametrize("argv", [["unmask"], ["unmask", "--reason", "  "]])
def test_unmask_without_a_reason_exits_2_and_records_nothing(unmask_env, capsys, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, tokens()[0]])
    assert info.value.code == EXIT_CONFIG and "--reason" in capsys.readouterr().err
    assert query(unmask_env, "SELECT to_regclass('pii_unmask_audit')") == [(None,)]


def test_unmask_refuses_to_show_anything_when_the_audit_cannot_be_written(unmask_env, monkeypatch, capsys) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres:s3cret@127.0.0.1:1/postgres")
    assert main(["unmask", "--reason", "no audit", *tokens()]) == EXIT_UNREACHABLE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "refusing to unmask without an audit record" in captured.err and "s3cret" not in captured.err
    assert not any(value in captured.err for value in VALUES.values())
