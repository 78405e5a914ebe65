"""Production shape against the real services: outages of thousands of retries, stops during an
outage, restarts beside an analyst's open transaction, large and refused quarantines, a queue that
goes away mid-run (issue 11, points 1-3, 7-9)."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime, timezone
from urllib.parse import urlsplit

import psycopg2
import pytest

from cli.exit_codes import EXIT_OK, EXIT_QUEUE_LOST, EXIT_STOPPED_UNCOMMITTED
from database.errors import DatabaseRejectedRows
from database.sqs_postgres import PostgresWriter
from helpers import (
    assert_exactly_once,
    drain_until_empty,
    login,
    output,
    query,
    queue_counts,
    send,
    set_visibility,
    start_etl,
    with_port,
)
from helpers import wait_for_rows as _wait_for_rows
from helpers import wait_until as _wait_until
from models import MaskedLogin, Rejection, WriteResult
from proxy import TcpProxy

pytestmark = pytest.mark.slow
FAST_BACKOFF = ("--backoff-base-seconds", "0.001", "--backoff-cap-seconds", "0.002")


def _proxied_database(etl_env: dict[str, str]) -> tuple[TcpProxy, dict[str, str]]:
    proxy = TcpProxy("127.0.0.1", urlsplit(etl_env["DATABASE_URL"]).port or 5432)
    return proxy, {**os.environ, "DATABASE_URL": with_port(etl_env["DATABASE_URL"], proxy.port)}


def _max_attempt(text: str) -> int:
    return max((int(n) for n in re.findall(r"PostgreSQL write failed \(attempt (\d+)\)", text)), default=0)


def test_follow_survives_thousands_of_refused_reconnects_then_stores_everything_once(
    etl_env, sqs_client, tmp_path
) -> None:
    """Point 1: at about the 1,024th failed attempt 2**attempt overflowed and killed --follow."""
    queue_url = etl_env["SQS_QUEUE_URL"]
    proxy, env = _proxied_database(etl_env)
    process = start_etl(tmp_path, "--follow", "--wait-seconds", "1", "--batch-size", "50", *FAST_BACKOFF, env=env)
    first = send(sqs_client, queue_url, [login(n) for n in range(50)])
    _wait_for_rows(etl_env["DATABASE_URL"], count=50)
    # GIVEN PostgreSQL unreachable: every reconnect is accepted by the proxy and closed at once
    proxy.cut()
    later = send(sqs_client, queue_url, [login(n) for n in range(50, 250)])
    _wait_until(lambda: _max_attempt(output(tmp_path)) >= 2_000, "2,000 failed attempts", timeout=90)
    assert process.poll() is None, output(tmp_path)
    # WHEN it comes back, THEN everything is stored once and the process is still the same one
    proxy.restore()
    _wait_for_rows(etl_env["DATABASE_URL"], count=250, timeout=60)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == EXIT_OK, output(tmp_path)
    proxy.close()
    assert "Traceback" not in output(tmp_path)
    assert queue_counts(sqs_client, queue_url) == (0, 0)
    assert_exactly_once(etl_env["DATABASE_URL"], first + later)


def test_sigterm_during_a_database_outage_exits_5_within_the_stop_timeout_and_a_later_drain_completes(
    etl_env, sqs_client, tmp_path
) -> None:
    """Point 2: the write retry ignored the stop; a stop during an outage ended only by SIGKILL."""
    queue_url = etl_env["SQS_QUEUE_URL"]
    set_visibility(sqs_client, queue_url, 5)
    proxy, env = _proxied_database(etl_env)
    process = start_etl(tmp_path, "--follow", "--wait-seconds", "1", "--stop-timeout", "3", env=env)
    ids = send(sqs_client, queue_url, [login(n) for n in range(20)])
    _wait_for_rows(etl_env["DATABASE_URL"], count=20)
    proxy.cut()
    ids += send(sqs_client, queue_url, [login(n) for n in range(20, 120)])
    _wait_until(lambda: "PostgreSQL write failed" in output(tmp_path), "a failed write")
    process.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert process.wait(timeout=25) == EXIT_STOPPED_UNCOMMITTED, output(tmp_path)
    assert time.monotonic() - started < 3 + 5  # the stop timeout, plus the receivers' 1 s poll
    text = output(tmp_path)
    assert re.search(r"stop timeout \(3 s\) passed: \d+ messages left uncommitted", text), text
    assert "Traceback" not in text
    proxy.close()
    time.sleep(5)  # the uncommitted messages' visibility lapses
    drain_until_empty(tmp_path, sqs_client, queue_url)
    assert_exactly_once(etl_env["DATABASE_URL"], ids)


def _analyst_reading_the_view(database_url: str) -> psycopg2.extensions.connection:
    """An analyst's session: a transaction that read user_login_duplicates and stays open."""
    conn = psycopg2.connect(database_url, application_name="psql")
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM user_login_duplicates")
    return conn


def test_a_restart_does_not_wait_for_an_analysts_open_transaction(etl_env, sqs_client, tmp_path) -> None:
    """Point 3: every start re-ran CREATE OR REPLACE VIEW, which waits for the analyst's lock."""
    PostgresWriter(etl_env["DATABASE_URL"]).connect()  # the schema exists: an earlier run made it
    analyst = _analyst_reading_the_view(etl_env["DATABASE_URL"])
    try:
        ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(30)])
        process = start_etl(tmp_path)
        assert process.wait(timeout=30) == EXIT_OK, output(tmp_path)
        assert_exactly_once(etl_env["DATABASE_URL"], ids)
    finally:
        analyst.rollback()
        analyst.close()


def test_a_migration_behind_an_analysts_lock_waits_in_bounded_steps_and_says_for_whom(
    etl_env, sqs_client, tmp_path
) -> None:
    PostgresWriter(etl_env["DATABASE_URL"]).connect()
    query(etl_env["DATABASE_URL"], "DELETE FROM etl_schema_version")  # the schema is behind
    analyst = _analyst_reading_the_view(etl_env["DATABASE_URL"])
    ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(10)])
    process = start_etl(tmp_path)
    try:
        _wait_until(lambda: "held by pid" in output(tmp_path), "a log line naming the lock holder")
        # The analyst is not stuck behind the ETL's queued lock: a new query of the view answers.
        other = psycopg2.connect(etl_env["DATABASE_URL"])
        with other, other.cursor() as cur:
            cur.execute("SET statement_timeout = 10000")
            cur.execute("SELECT count(*) FROM user_login_duplicates")
        other.close()
        assert process.poll() is None
    finally:
        analyst.rollback()
        analyst.close()
    assert process.wait(timeout=60) == EXIT_OK, output(tmp_path)
    assert "psql, idle in transaction" in output(tmp_path)
    assert_exactly_once(etl_env["DATABASE_URL"], ids)


def test_1500_rejections_in_one_batch_are_counted_right(etl_env, sqs_client, tmp_path) -> None:
    """Point 7: execute_values pages of 1,000 left rowcount at the last page's count."""
    bodies = [login(n) for n in range(500)] + ["not json"] * 1500
    ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], bodies)
    process = start_etl(tmp_path, "--batch-size", "5000", "--flush-seconds", "60")
    assert process.wait(timeout=120) == EXIT_OK, output(tmp_path)
    assert "loaded 500, rejected 1500, duplicates skipped 0" in output(tmp_path), output(tmp_path)
    assert_exactly_once(etl_env["DATABASE_URL"], ids)


def _rejection(n: int) -> Rejection:
    return Rejection(f"r-{n}", "body is not valid JSON (at character 0)", "v1.x", datetime.now(timezone.utc), 1)


def test_the_writer_counts_rejections_beyond_one_page(database_url) -> None:
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        assert writer.write([], [_rejection(n) for n in range(1500)]) == WriteResult(0, 1500, 0)
        assert writer.write([], [_rejection(n) for n in range(1400, 2600)]) == WriteResult(0, 1100, 100)
    finally:
        writer.close()


def test_a_quarantine_row_postgresql_refuses_is_stored_in_a_minimal_form_and_the_queue_moves_on(
    etl_env, sqs_client, tmp_path
) -> None:
    """Point 8: only logins were probed; a refused rejection row failed its batch for ever."""
    PostgresWriter(etl_env["DATABASE_URL"]).connect()
    # An operator's constraint (any row-level refusal would do) that the reason of a bad body breaks
    query(
        etl_env["DATABASE_URL"],
        "ALTER TABLE user_logins_rejected ADD CONSTRAINT no_json_reasons "
        "CHECK (reason NOT LIKE 'body is not valid JSON%%')",
    )
    ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(10)] + ["not json"])
    process = start_etl(tmp_path, "--retry-budget-seconds", "5")
    assert process.wait(timeout=60) == EXIT_OK, output(tmp_path)
    [(reason, sent_at)] = query(
        etl_env["DATABASE_URL"], "SELECT reason, sent_at FROM user_logins_rejected WHERE message_id = %s", (ids[-1],)
    )
    assert reason.startswith("quarantine row refused by PostgreSQL: 23514") and sent_at is None
    assert queue_counts(sqs_client, etl_env["SQS_QUEUE_URL"]) == (0, 0)
    assert_exactly_once(etl_env["DATABASE_URL"], ids)


def test_the_writer_names_refused_quarantine_rows(database_url) -> None:
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        query(database_url, "ALTER TABLE user_logins_rejected ADD CONSTRAINT small CHECK (receive_count < 100)")
        bad = Rejection("r-bad", "x", "v1.x", None, 500)
        with pytest.raises(DatabaseRejectedRows) as info:
            writer.write([], [_rejection(1), bad])
        assert [row for row, _ in info.value.bad_rejections] == [bad] and info.value.bad_logins == []
    finally:
        writer.close()


def test_a_message_is_never_stored_in_both_tables(database_url) -> None:
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        login_row = MaskedLogin("m-1", "u", "ios", "v1.a", "v1.b", None, "1.0", datetime.now(timezone.utc).date())
        assert writer.write([login_row], []).inserted == 1
        quarantined_later = Rejection("m-1", "processing failed 5 times: RuntimeError", "v1.x", None, 5)
        assert writer.write([], [quarantined_later]) == WriteResult(0, 0, 1)
        assert writer.write([], [_rejection(7)]).rejected == 1
        loaded_later = MaskedLogin("r-7", "u", "ios", "v1.a", "v1.b", None, "1.0", login_row.create_date)
        assert writer.write([loaded_later], [], redelivered=True) == WriteResult(0, 0, 1)
    finally:
        writer.close()
    assert query(database_url, "SELECT count(*) FROM user_logins l JOIN user_logins_rejected r USING (message_id)") == [
        (0,)
    ]


def test_a_queue_deleted_mid_run_exits_6_saying_so(etl_env, sqs_client, tmp_path) -> None:
    """Point 9: a permanent SQS error mid-run exited 3, documented as 'unreachable at start'."""
    queue_url = etl_env["SQS_QUEUE_URL"]
    process = start_etl(tmp_path, "--follow", "--wait-seconds", "1")
    send(sqs_client, queue_url, [login(n) for n in range(10)])
    _wait_for_rows(etl_env["DATABASE_URL"], count=10)
    sqs_client.delete_queue(QueueUrl=queue_url)
    try:
        assert process.wait(timeout=60) == EXIT_QUEUE_LOST, output(tmp_path)
    finally:
        sqs_client.create_queue(QueueName=queue_url.rsplit("/", 1)[1])  # for the fixture's teardown
    text = output(tmp_path)
    assert "error: the queue became unusable mid-run" in text and "Traceback" not in text
