"""Helpers for integration tests: send, count and query against the real services."""

from __future__ import annotations

import json
import os
from typing import Any, NoReturn

import psycopg2
import pytest

from tests.fakes import GOOD_LOGIN, login  # noqa: F401 - the samples, shared with the unit tests

IN_CI = os.environ.get("CI", "").lower() == "true"


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
