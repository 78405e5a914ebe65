"""Helpers for integration tests: send, count and query against the real services; start the ETL as
users do and check that every message was stored exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

from tests.fakes import GOOD_LOGIN, login  # noqa: F401 - the samples, shared with the unit tests

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() == "true"
TEST_SQS_ENDPOINT = os.environ.get("TEST_SQS_ENDPOINT", "http://localhost:4566")
# moto, for KMS and Secrets Manager (LocalStack's KMS does not run on Python 3.11)
TEST_KMS_ENDPOINT = os.environ.get("TEST_KMS_ENDPOINT", "http://127.0.0.1:4599")


def emulator_client(
    service: str, endpoint_url: str, region: str = "us-east-1", *, attempts: int = 1, connect_timeout: float = 2
) -> Any:
    """A boto3 client for one of the test emulators, with their dummy credentials; one attempt by
    default, so that a missing emulator shows at once."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(connect_timeout=connect_timeout, retries={"max_attempts": attempts}),
    )


def unavailable(what: str) -> NoReturn:
    """Skip locally, fail in CI: a green CI run must have run every test."""
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true")
    pytest.skip(f"{what} is not available")


def pii_values(bodies: list[str]) -> set[str]:
    """Every `ip` and `device_id` value in the bodies that parse as JSON objects."""
    values: set[str] = set()
    for body in bodies:
        try:
            data = json.loads(body)
        except ValueError:
            continue
        if isinstance(data, dict):
            values.update(str(data[k]) for k in ("ip", "device_id") if k in data)
    return values


def send(sqs: Any, queue_url: str, bodies: list[str]) -> list[str]:
    """Send bodies in batches of 10; return their MessageIds in order."""
    ids: list[str] = []
    for start in range(0, len(bodies), 10):
        chunk = bodies[start : start + 10]
        response = sqs.send_message_batch(
            QueueUrl=queue_url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(chunk)]
        )
        assert not response.get("Failed"), response.get("Failed")
        by_id = {entry["Id"]: entry["MessageId"] for entry in response["Successful"]}
        ids.extend(by_id[str(i)] for i in range(len(chunk)))
    return ids


def queue_counts(sqs: Any, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    attrs = sqs.get_queue_attributes(
        QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]), int(attrs["ApproximateNumberOfMessagesNotVisible"])


def query(database_url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def connect_at_once(database_url: str, processes: int = 4) -> list[BaseException]:
    """Start `processes` writers at the same moment (each sets up the schema as an ETL's start does);
    returns what they raised."""
    import threading

    from database.sqs_postgres import PostgresWriter

    errors: list[BaseException] = []
    barrier = threading.Barrier(processes)

    def start() -> None:
        writer = PostgresWriter(database_url)
        barrier.wait()
        try:
            writer.connect()
        except BaseException as exc:  # noqa: BLE001 - collected for the test to show
            errors.append(exc)
        finally:
            writer.close()

    threads = [threading.Thread(target=start) for _ in range(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a writer's start still waits after 60 s"
    return errors


def start_etl(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `python main.py ARGS` as users run it; output goes to files in tmp_path."""
    n = len(list(tmp_path.glob("etl-*.out")))
    out = open(tmp_path / f"etl-{n}.out", "w")  # noqa: SIM115 - closed by the OS when the test ends
    err = open(tmp_path / f"etl-{n}.err", "w")  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=tmp_path,
        stdout=out,
        stderr=err,
        text=True,
        env=env or os.environ.copy(),
    )


def output(tmp_path: Path) -> str:
    """Everything the ETL processes started by start_etl in tmp_path printed, stdout and stderr."""
    return "".join(p.read_text() for p in sorted(tmp_path.glob("etl-*.*")))


def set_visibility(sqs, queue_url: str, seconds: int, **extra: str) -> None:
    """Set the queue's VisibilityTimeout (and any other attributes given)."""
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"VisibilityTimeout": str(seconds), **extra})


def stored_ids(database_url: str) -> Counter[str]:
    """How many times each message id is stored, loaded or quarantined."""
    rows = query(
        database_url,
        "SELECT message_id FROM user_logins WHERE message_id IS NOT NULL "
        "UNION ALL SELECT message_id FROM user_logins_rejected",
    )
    return Counter(r[0] for r in rows)


def assert_exactly_once(database_url: str, ids: list[str]) -> None:
    """Every one of `ids`, and nothing else, is stored once: in user_logins or user_logins_rejected."""
    stored = stored_ids(database_url)
    assert not [i for i, n in stored.items() if n > 1], "a message was stored twice"
    missing = set(ids) - set(stored)
    assert not missing, f"{len(missing)} messages lost"
    assert set(stored) == set(ids)


def drain_until_empty(tmp_path: Path, sqs, queue_url: str, attempts: int = 10) -> None:
    """Drain again until no message is visible or in flight (killed runs leave some in flight)."""
    for _ in range(attempts):
        assert start_etl(tmp_path).wait(timeout=120) == 0, output(tmp_path)
        if queue_counts(sqs, queue_url) == (0, 0):
            return
        time.sleep(1)
    raise AssertionError(f"queue not empty: {queue_counts(sqs, queue_url)}")


@contextmanager
def locked_logins(database_url: str) -> Iterator[None]:
    """Hold an exclusive lock on user_logins: every insert into it waits until the block ends.

    The ETL's token indexer may be building a closed day's index CONCURRENTLY as the lock is asked
    for (a fresh ETL's first pass): that build waits for this transaction, this lock for the build,
    and PostgreSQL breaks the deadlock by failing one of them. When it fails this one, ask again: the
    build then ends (or, failed, leaves an INVALID index the indexer drops), and the lock is granted.
    """
    conn = psycopg2.connect(database_url)
    try:
        for attempt in range(5):
            try:
                with conn.cursor() as cur:
                    cur.execute("LOCK TABLE user_logins IN ACCESS EXCLUSIVE MODE")
                break
            except psycopg2.errors.DeadlockDetected:
                conn.rollback()
                if attempt == 4:
                    raise
                time.sleep(0.2)
        yield
    finally:
        conn.rollback()
        conn.close()


def with_port(url: str, port: int) -> str:
    """`url` with its port replaced (to go through a proxy)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{port}"))


def wait_for_rows(database_url: str, timeout: float = 30, count: int = 1) -> None:
    """Wait until user_logins holds at least `count` rows."""
    wait_until(
        lambda: count_of(database_url, "SELECT count(*) FROM user_logins") >= count,
        f"{count} rows in user_logins",
        timeout,
    )


def count_of(database_url: str, sql: str) -> int:
    """The one number `sql` selects (0 before the tables exist)."""
    try:
        return int(query(database_url, sql)[0][0])
    except psycopg2.errors.UndefinedTable:
        return 0


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll `condition` every 20 ms; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def dump_schema(database_url: str) -> str:
    """`pg_dump --data-only` of the test's schema (the search_path its URL's options set): every
    value stored, as text, for checks that no raw value reached a table."""
    schema = query(database_url, "SELECT current_schema()")[0][0]
    return subprocess.run(
        ["pg_dump", "--data-only", "-n", schema, database_url.split("?")[0]], capture_output=True, text=True, check=True
    ).stdout
