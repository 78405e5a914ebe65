"""Helpers for integration tests: send, count and query against the real services."""

from __future__ import annotations

import json
import os
from typing import Any, NoReturn

import psycopg2
import pytest

from tests.fakes import GOOD_LOGIN, login  # noqa: F401 - the samples, shared with the unit tests

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
