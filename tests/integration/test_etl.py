"""The ETL end to end against the real PostgreSQL and the SQS emulator over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE
from database.schema import SCHEMA_VERSION
from database.sqs_postgres import STAGED_BATCHES_AFTER_CONFLICT, PostgresWriter
from helpers import GOOD_LOGIN, connect_at_once, dump_schema, login, pii_values, query, queue_counts, send
from main import main
from models import MaskedLogin, WriteResult
from pii.masking import Masker, decode_key, generate_key
from sample_data import generate

ROOT = Path(__file__).resolve().parents[2]


def test_drain_loads_every_message_and_empties_the_queue(etl_env, sqs_client, capsys) -> None:
    bodies = list(generate(300, seed=3))
    ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], bodies)

    assert main([]) == EXIT_OK

    loaded = query(etl_env["DATABASE_URL"], "SELECT message_id FROM user_logins")
    rejected = query(etl_env["DATABASE_URL"], "SELECT message_id FROM user_logins_rejected")
    assert sorted(r[0] for r in loaded + rejected) == sorted(ids)
    assert len(rejected) == sum(1 for b in bodies if not _is_good(b))
    assert queue_counts(sqs_client, etl_env["SQS_QUEUE_URL"]) == (0, 0)
    summary = capsys.readouterr().out.strip()
    assert summary.startswith(f"loaded {len(loaded)}, rejected {len(rejected)},") and " s (" in summary


def test_rows_keep_app_version_text_and_are_dated_by_the_sent_time(etl_env, sqs_client) -> None:
    send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(1, app_version="2.3.0"), login(2, app_version="0.96")])
    assert main([]) == EXIT_OK
    rows = query(
        etl_env["DATABASE_URL"],
        "SELECT app_version, create_date = (now() AT TIME ZONE 'UTC')::date FROM user_logins ORDER BY 1",
    )
    assert rows == [("0.96", True), ("2.3.0", True)]


def test_a_malformed_message_is_quarantined_while_the_good_ones_in_its_batch_land(etl_env, sqs_client) -> None:
    bad = '{"user_id": "u", "ip": "203.0.113.9", "device_id": "111-22-3333", "device_type": 7}'
    bodies = [login(n) for n in range(9)]
    bodies.insert(4, bad)
    ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], bodies)

    assert main([]) == EXIT_OK

    assert query(etl_env["DATABASE_URL"], "SELECT count(*) FROM user_logins") == [(9,)]
    [(message_id, reason, encrypted)] = query(
        etl_env["DATABASE_URL"], "SELECT message_id, reason, encrypted_body FROM user_logins_rejected"
    )
    assert message_id == ids[4]
    assert reason == "field 'device_type' must be a string, got number"
    assert "203.0.113.9" not in encrypted
    assert Masker(decode_key(etl_env["MASKING_KEY"])).unmask(encrypted) == bad
    assert queue_counts(sqs_client, etl_env["SQS_QUEUE_URL"]) == (0, 0)


def test_a_message_redelivered_after_its_commit_is_stored_once(etl_env, sqs_client) -> None:
    # GIVEN a message that a previous run committed but crashed before deleting
    [message_id] = send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(7)])
    masker = Masker(decode_key(etl_env["MASKING_KEY"]))
    writer = PostgresWriter(etl_env["DATABASE_URL"])
    writer.connect()
    first = writer.write(
        [
            MaskedLogin(
                message_id,
                "user-7",
                "android",
                masker.mask("ip", "10.0.0.7"),
                masker.mask("device_id", "107-10-1007"),
                None,
                "1.0",
                __import__("datetime").date.today(),
            )
        ],
        [],
    )
    writer.close()
    assert first.inserted == 1
    # WHEN the message comes back and the ETL runs
    assert main([]) == EXIT_OK
    # THEN it is stored once and deleted
    assert query(etl_env["DATABASE_URL"], "SELECT count(*) FROM user_logins WHERE message_id = %s", (message_id,)) == [
        (1,)
    ]
    assert queue_counts(sqs_client, etl_env["SQS_QUEUE_URL"]) == (0, 0)


def _row(n: int, masker: Masker) -> MaskedLogin:
    return MaskedLogin(
        f"message-{n}",
        f"user-{n}",
        "ios",
        masker.mask("ip", f"10.0.0.{n % 250}"),
        masker.mask("device_id", f"{n:03d}-00-0000"),
        None,
        "2.3.0",
        date(2024, 1, 2),
    )


def test_a_batch_holding_stored_messages_falls_back_to_on_conflict_and_later_batches_copy_again(database_url) -> None:
    # GIVEN a writer that stored rows 0-4 with a straight COPY
    masker = Masker(decode_key(generate_key()))
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        assert writer.write([_row(n, masker) for n in range(5)], []) == WriteResult(5, 0, 0)
        # WHEN a batch repeats two of them (a redelivery) beside three new ones
        again = writer.write([_row(n, masker) for n in (3, 4, 5, 6, 7)], [])
        # THEN the COPY is refused, the batch goes through ON CONFLICT: only the new rows land
        assert again == WriteResult(inserted=3, rejected=0, duplicates=2)
        # AND once the staged batches after a conflict are used up, repeats are still caught
        batches = STAGED_BATCHES_AFTER_CONFLICT + 2
        for start in range(8, 8 + 2 * batches, 2):  # each batch repeats the last row of the one before
            assert writer.write([_row(n, masker) for n in (start - 1, start, start + 1)], []) == WriteResult(2, 0, 1)
    finally:
        writer.close()
    stored = query(database_url, "SELECT message_id, count(*) FROM user_logins GROUP BY message_id")
    assert len(stored) == 8 + 2 * batches and {count for _, count in stored} == {1}


def test_the_original_exercise_table_is_migrated_in_place_keeping_its_rows(etl_env, sqs_client) -> None:
    query(
        etl_env["DATABASE_URL"],
        """
        CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
            masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date);
        INSERT INTO user_logins VALUES ('old', 'ios', 'x', 'y', NULL, 2, '2020-01-01')""",
    )
    send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(1, app_version="2.3.0")])

    assert main([]) == EXIT_OK

    assert query(
        etl_env["DATABASE_URL"], "SELECT user_id, app_version, message_id IS NULL FROM user_logins ORDER BY user_id"
    ) == [("old", "2", True), ("user-1", "2.3.0", False)]
    [(data_type,)] = query(
        etl_env["DATABASE_URL"],
        "SELECT data_type FROM information_schema.columns WHERE "
        "table_schema = current_schema() AND table_name = 'user_logins' "
        "AND column_name = 'app_version'",
    )
    assert data_type == "character varying"


def test_two_processes_setting_up_the_schema_at_once_both_succeed(database_url) -> None:
    assert connect_at_once(database_url) == []
    assert query(database_url, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)]


def test_unmask_round_trips_a_stored_token(etl_env, sqs_client, capsys) -> None:
    send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(0, ip="198.51.100.23", device_id="321-54-9876")])
    assert main([]) == EXIT_OK
    [(masked_ip, masked_device_id)] = query(
        etl_env["DATABASE_URL"], "SELECT masked_ip, masked_device_id FROM user_logins"
    )
    capsys.readouterr()
    assert main(["unmask", "--reason", "round trip test", masked_device_id, masked_ip]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["321-54-9876", "198.51.100.23"]


def test_without_a_key_the_run_exits_2_and_consumes_nothing(etl_env, sqs_client, monkeypatch, capsys) -> None:
    send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(5)])
    monkeypatch.delenv("MASKING_KEY")

    assert main([]) == EXIT_CONFIG

    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MASKING_KEY" in err[0]
    assert queue_counts(sqs_client, etl_env["SQS_QUEUE_URL"]) == (5, 0)


def test_an_unreachable_database_at_start_exits_3_and_consumes_nothing(etl_env, sqs_client, monkeypatch, capsys):
    send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(1)])
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres:s3cret@127.0.0.1:1/postgres")

    assert main([]) == EXIT_UNREACHABLE

    err = capsys.readouterr().err
    assert "PostgreSQL unreachable" in err and "s3cret" not in err and "Traceback" not in err
    assert queue_counts(sqs_client, etl_env["SQS_QUEUE_URL"]) == (1, 0)


def test_a_missing_queue_at_start_exits_3(etl_env, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SQS_QUEUE_URL", etl_env["SQS_QUEUE_URL"] + "-does-not-exist")
    assert main([]) == EXIT_UNREACHABLE
    assert "unusable" in capsys.readouterr().err


def test_no_raw_ip_or_device_id_reaches_the_database_or_the_output(etl_env, sqs_client, tmp_path) -> None:
    # GIVEN good and malformed messages (malformed ones still carry PII in their bodies)
    bodies = list(generate(200, seed=11)) + [
        '{"ip": "203.0.113.77", "device_id": "555-66-7777"',
        json.dumps({**GOOD_LOGIN, "ip": "203.0.113.78", "device_id": "555-66-7778", "user_id": 1}),
    ]
    send(sqs_client, etl_env["SQS_QUEUE_URL"], bodies)
    secrets = {"203.0.113.77", "555-66-7777", "203.0.113.78", "555-66-7778"} | pii_values(bodies)
    # WHEN the ETL runs as users run it, with debug logging
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "-v"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # THEN neither its output nor a dump of its tables holds a raw value or the key
    dump = dump_schema(etl_env["DATABASE_URL"])
    assert query(etl_env["DATABASE_URL"], "SELECT count(*) FROM user_logins")[0][0] > 150
    assert "\tAQAAAA" in dump  # the dump really holds the tokens (Tink's prefix, key id 1)
    for text in (result.stdout, result.stderr, dump):
        leaked = sorted(s for s in secrets if s in text)
        assert leaked == []
        assert etl_env["MASKING_KEY"] not in text


def _is_good(body: str) -> bool:
    from models import InvalidMessage, LoginEvent

    try:
        LoginEvent.from_body(body)
    except InvalidMessage:
        return False
    return True
