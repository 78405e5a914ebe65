"""One version, one key: a database that has tokens of key version 1 refuses another key under version 1.

The scenario of a second clone: its set-up made a fresh key, version 1, and its `.env` points at the
first clone's database. The ETL, rekey, replay and the Lambda refuse it before anything is written
or deleted; `check` says so; `unmask` names the cause."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNMASK_FAILED
from helpers import login, query, queue_counts, send
from lambda_handler import cold_start
from main import main
from pii.masking import generate_key


def sqs_record(body: str) -> dict[str, Any]:
    """One record as the event source mapping delivers it (the fields the handler reads)."""
    sent_ms = str(int(time.time() * 1000))
    return {
        "messageId": str(uuid.uuid4()),
        "receiptHandle": f"AQEB{uuid.uuid4().hex}",
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": sent_ms},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:login-queue",
    }


@pytest.fixture
def first_key_loaded(etl_env: dict[str, str], sqs_client, queue_url: str, database_url: str) -> str:
    """The first clone's run: rows of key version 1 in the database; returns one of their tokens."""
    send(sqs_client, queue_url, [login(1), login(2)])
    assert main(["--wait-seconds", "0"]) == EXIT_OK
    assert query(database_url, "SELECT key_version FROM etl_key_checks") == [(1,)]
    return query(database_url, "SELECT masked_ip FROM user_logins ORDER BY masked_ip LIMIT 1")[0][0]


@pytest.fixture
def second_key(first_key_loaded: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The second clone's key: another key, also version 1."""
    other = generate_key()
    monkeypatch.setenv("MASKING_KEY", other)
    return other


def test_the_etl_refuses_another_key_under_a_known_version_and_consumes_nothing(
    second_key: str, sqs_client, queue_url: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN messages waiting, and a key 1 that is not the database's key 1
    send(sqs_client, queue_url, [login(3), login(4), login(5)])
    rows = query(database_url, "SELECT count(*) FROM user_logins")
    capsys.readouterr()
    # WHEN the ETL starts with it
    code = main(["--wait-seconds", "0"])
    # THEN it exits 2 with one line, nothing was written, and nothing was taken off the queue
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_CONFIG
    assert len(err) == 1 and "key version 1" in err[0] and "different key" in err[0] and "nothing" in err[0]
    assert query(database_url, "SELECT count(*) FROM user_logins") == rows
    visible, in_flight = queue_counts(sqs_client, queue_url)
    assert visible + in_flight == 3
    assert len(query(database_url, "SELECT * FROM etl_key_checks")) == 1


def test_rekey_backfill_and_replay_refuse_it_too(
    second_key: str, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = query(database_url, "SELECT masked_ip, masked_device_id FROM user_logins ORDER BY 1")
    for argv in (
        ["rekey"],
        ["backfill-networks"],
        ["replay", "--reason", "test"],
        ["replay", "--reason", "test", "--dry-run"],
    ):
        capsys.readouterr()
        assert main(argv) == EXIT_CONFIG, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "different key" in err[0], (argv, err)
    assert query(database_url, "SELECT masked_ip, masked_device_id FROM user_logins ORDER BY 1") == before
    assert query(database_url, "SELECT to_regclass('etl_replay_audit')") == [(None,)]  # no replay audited


def test_check_reports_the_other_key_and_exits_2(second_key: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["check"]) == EXIT_CONFIG
    out = capsys.readouterr().out
    assert "✗ keys: key version 1: this database already holds tokens of a different key" in out


def test_check_says_the_keys_match_for_the_database_key(
    first_key_loaded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["check"]) == EXIT_OK
    assert "✓ keys: version 1 the same key as the database's" in capsys.readouterr().out


def test_unmask_names_a_different_key_with_that_version(
    first_key_loaded: str, second_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["unmask", "--reason", "test", first_key_loaded]) == EXIT_UNMASK_FAILED
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: token 1: made by a different key with version 1")


def test_the_lambda_reports_every_record_for_retry_and_writes_nothing(
    second_key: str, etl_env: dict[str, str], database_url: str
) -> None:
    handler = cold_start({**etl_env, "MASKING_KEY": second_key})
    records = [sqs_record(login(6)), sqs_record(login(7))]
    rows = query(database_url, "SELECT count(*) FROM user_logins")
    response = handler.handle({"Records": records}, None)
    assert sorted(item["itemIdentifier"] for item in response["batchItemFailures"]) == sorted(
        r["messageId"] for r in records
    )
    assert query(database_url, "SELECT count(*) FROM user_logins") == rows
    # AND the next invocation checks again (the connection was not kept)
    assert not handler.writer.connected


def test_a_new_version_of_the_second_key_is_accepted_beside_the_first(
    first_key_loaded: str, monkeypatch: pytest.MonkeyPatch, sqs_client, queue_url: str, database_url: str
) -> None:
    # GIVEN the fix the message proposes: the other key under a version of its own
    monkeypatch.delenv("MASKING_KEY")
    monkeypatch.setenv("MASKING_KEYS", f"2:{generate_key()}")
    send(sqs_client, queue_url, [login(8)])
    assert main(["--wait-seconds", "0"]) == EXIT_OK
    assert query(database_url, "SELECT key_version FROM etl_key_checks ORDER BY 1") == [(1,), (2,)]
