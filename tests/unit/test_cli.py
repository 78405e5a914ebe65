"""The CLI surface that needs no service: keygen, unmask, --help, configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNMASK_FAILED
from main import main
from pii.masking import Masker, decode_key, generate_key


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    for name in ("MASKING_KEYS", "MASKING_KEY_FILE", "MASKING_KEY_KMS_CIPHERTEXT", "MASKING_KEY_VERSION"):
        monkeypatch.delenv(name, raising=False)
    value = generate_key()
    monkeypatch.setenv("MASKING_KEY", value)
    # The audit goes to PostgreSQL (tests/integration/test_keys_audit.py); stubbed out here.
    monkeypatch.setattr("cli.unmask.AuditLog.record", lambda _self, entry: None)
    monkeypatch.setattr("cli.unmask.key_mismatches", lambda _dsn, _held: [])  # the database's key checks: integration
    return value


def test_keygen_prints_a_valid_new_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen"]) == EXIT_OK
    printed = capsys.readouterr().out.strip()
    assert len(decode_key(printed)) == 64


@pytest.mark.parametrize("argv", [["--help"], ["unmask", "--help"], ["keygen", "--help"], ["replay", "--help"]])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_a_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--batch-size", "0"])
    assert info.value.code == EXIT_CONFIG


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--progress-seconds", "0"], "--progress-seconds: must be > 0"),
        (["--progress-seconds", "nan"], "--progress-seconds: must be > 0"),
        (["--retry-budget-seconds", "-1"], "--retry-budget-seconds: must be >= 0"),
        (["--flush-seconds", "-0.5"], "--flush-seconds: must be >= 0"),
        (["--metrics-port", "0"], "--metrics-port: must be a port number, 1..65535"),
        (["--metrics-port", "70000"], "--metrics-port: must be a port number, 1..65535"),
        (["replay", "--reason", " "], "--reason: must not be blank"),
        (["replay", "--dry-run"], "the following arguments are required: --reason"),
        (["replay", "--reason", "r", "--since", "yesterday"], "--since: expected an ISO date or date-time"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser_with_exit_2_and_one_line(
    argv: list[str],
    says: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err


def test_unmask_prints_each_original_value_in_order(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    masker = Masker(decode_key(key))
    tokens = [masker.mask("ip", "10.1.2.3"), masker.mask("device_id", "593-47-5928"), masker.mask("ip", "::1")]
    assert main(["unmask", "--reason", "test", *tokens]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["10.1.2.3", "593-47-5928", "::1"]


HOSTILE = "\x1b]0;pwned\x07\x1b[2J10.0.0.1\u202e\r\nnext\\x1b\x9b"


def test_unmask_escapes_control_characters_so_a_value_cannot_drive_the_terminal(
    key: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    masker = Masker(decode_key(key))
    assert main(["unmask", "--reason", "test", masker.mask("ip", HOSTILE), masker.mask("ip", "10.1.2.3")]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.splitlines() == ["\\x1b]0;pwned\\x07\\x1b[2J10.0.0.1\\u202e\\r\\nnext\\\\x1b\\x9b", "10.1.2.3"]
    assert out.isascii() and "\x1b" not in out


def test_unmask_raw_prints_values_byte_exact(key: str, capsys: pytest.CaptureFixture[str]) -> None:
    masker = Masker(decode_key(key))
    assert main(["unmask", "--raw", "--reason", "test", masker.mask("ip", HOSTILE)]) == EXIT_OK
    assert capsys.readouterr().out == HOSTILE + "\n"


def test_unmask_of_a_foreign_token_fails_clearly_without_traceback(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = Masker(decode_key(generate_key())).mask("ip", "10.1.2.3")
    good = Masker(decode_key(key)).mask("ip", "10.9.9.9")
    assert main(["unmask", "--reason", "test", good, foreign]) == EXIT_UNMASK_FAILED
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "error: token 2: token does not decrypt under this key (wrong key, or tampered)"


def test_a_missing_key_exits_2_with_one_line_naming_masking_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MASKING_KEY", raising=False)
    assert main(["unmask", "--reason", "test", "v1.abc"]) == EXIT_CONFIG
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASKING_KEY" in err[0] and "keygen" in err[0]


def test_replay_since_takes_a_date_a_date_time_or_an_age() -> None:
    from datetime import datetime, timedelta, timezone

    from cli.arguments import since

    assert since("2026-11-26") == datetime(2026, 11, 26, tzinfo=timezone.utc)
    assert since("2026-11-26T09:30:00Z") == datetime(2026, 11, 26, 9, 30, tzinfo=timezone.utc)
    assert since("2026-11-26T09:30:00+01:00") == datetime(2026, 11, 26, 8, 30, tzinfo=timezone.utc)
    before = datetime.now(timezone.utc)
    assert abs(since("12h") - (before - timedelta(hours=12))) < timedelta(seconds=5)
    assert abs(since("7d") - (before - timedelta(days=7))) < timedelta(seconds=5)


def test_a_closed_pipe_ends_quietly_with_141_and_no_traceback(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    # GIVEN `python main.py check | head -1` whose reader is gone before the output is written
    root = Path(__file__).resolve().parents[2]
    env = {n: v for n, v in os.environ.items() if not n.startswith("MASKING_KEY")}
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run(
            [sys.executable, str(root / "main.py"), "check"],
            cwd=tmp_path,
            env=env,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(writer)
    # THEN no traceback, and the code says the output was cut short
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 141
