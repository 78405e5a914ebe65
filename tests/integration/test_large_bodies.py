"""Large bodies through the real emulator and PostgreSQL: the size policy at its limit, a flood of
large bodies among ordinary ones under a small bound on bytes in hand, and the Lambda handler.

The queues are made with MaximumMessageSize 1,048,576 (1 MiB, SQS's largest since 2025-08), which
LocalStack 4.11.1 accepts (it refuses a body one byte longer); an emulator that refuses 1 MiB gets
262,144 and the 1 MiB bodies are left out (LARGEST_BODY says which the run used).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import lambda_handler
from etl.transform import DEFAULT_MAX_BODY_BYTES, TOO_LARGE_PREFIX_BYTES, TRUNCATED_MARKER
from helpers import assert_exactly_once, dump_schema, output, query, queue_counts, start_etl
from pii.masking import BODY_FIELD, Masker, decode_key
from tests.fakes import login

pytestmark = pytest.mark.slow

MIB = 1_048_576


@pytest.fixture
def queue_url(sqs_client: Any) -> Iterator[str]:
    """This module's queue (it overrides the shared fixture): the largest MaximumMessageSize the emulator takes."""
    name = f"test-{uuid.uuid4().hex}"
    try:
        url = sqs_client.create_queue(QueueName=name, Attributes={"MaximumMessageSize": str(MIB)})["QueueUrl"]
    except sqs_client.exceptions.ClientError:
        url = sqs_client.create_queue(QueueName=name, Attributes={"MaximumMessageSize": "262144"})["QueueUrl"]
    yield url
    sqs_client.delete_queue(QueueUrl=url)


def largest_body(sqs_client: Any, queue_url: str) -> int:
    attributes = sqs_client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["MaximumMessageSize"])
    return int(attributes["Attributes"]["MaximumMessageSize"])


def event_of_size(n: int, size: int, marker: str) -> str:
    """A valid login event of exactly `size` bytes: an unknown field carries `marker` and padding."""
    base = login(n, extra=marker)
    return login(n, extra=marker + "p" * (size - len(base)))


def not_json_of_size(size: int, marker: str) -> str:
    return (marker + " not json ").ljust(size, "q")


def send_all(sqs: Any, queue_url: str, bodies: list[str]) -> list[str]:
    """Send one at a time (SendMessageBatch is bounded at 1 MiB per call); return the ids in order."""
    return [sqs.send_message(QueueUrl=queue_url, MessageBody=body)["MessageId"] for body in bodies]


def rejections(database_url: str) -> dict[str, tuple[str, str]]:
    rows = query(database_url, "SELECT message_id, reason, encrypted_body FROM user_logins_rejected")
    return {message_id: (reason, body) for message_id, reason, body in rows}


def test_bodies_at_and_just_under_the_limit_load_and_just_over_it_are_quarantined_bounded(
    etl_env: dict[str, str], sqs_client: Any, tmp_path: Any, masking_key: str
) -> None:
    # GIVEN valid events of the limit -1, the limit and the limit +1 bytes, and a not-JSON body over it
    limit = DEFAULT_MAX_BODY_BYTES
    markers = [f"MARK{uuid.uuid4().hex}" for _ in range(4)]
    bodies = [
        event_of_size(1, limit - 1, markers[0]),
        event_of_size(2, limit, markers[1]),
        event_of_size(3, limit + 1, markers[2]),
        not_json_of_size(limit + 1, markers[3]),
    ]
    assert [len(b.encode()) for b in bodies] == [limit - 1, limit, limit + 1, limit + 1]
    ids = send_all(sqs_client, etl_env["SQS_QUEUE_URL"], bodies)
    # WHEN the ETL drains the queue with its defaults
    process = start_etl(tmp_path, "-v")
    assert process.wait(timeout=120) == 0, output(tmp_path)[-3000:]
    # THEN the two within the limit are loaded, without their unknown field; the two over it quarantined
    database_url = etl_env["DATABASE_URL"]
    assert sorted(r[0] for r in query(database_url, "SELECT message_id FROM user_logins")) == sorted(ids[:2])
    quarantined = rejections(database_url)
    assert sorted(quarantined) == sorted(ids[2:])
    masker = Masker(decode_key(masking_key))
    for message_id, body in zip(ids[2:], bodies[2:], strict=True):
        reason, encrypted = quarantined[message_id]
        digest = hashlib.sha256(body.encode()).hexdigest()
        assert reason == (
            f"body too large: {limit + 1} bytes, limit {limit}; sha256 {digest}; "
            f"first {TOO_LARGE_PREFIX_BYTES} bytes kept"
        )
        assert len(encrypted) < 2 * TOO_LARGE_PREFIX_BYTES  # bounded, not the whole body
        assert masker.unmask(encrypted, (BODY_FIELD,)) == TRUNCATED_MARKER + body[:TOO_LARGE_PREFIX_BYTES]
    assert queue_counts(sqs_client, etl_env["SQS_QUEUE_URL"]) == (0, 0)
    assert_exactly_once(database_url, ids)
    logs, dump = output(tmp_path), dump_schema(database_url)
    assert [m for m in markers if m in logs or m in dump] == []


def test_a_flood_of_large_bodies_among_ordinary_ones_is_stored_once_under_a_small_bound(
    etl_env: dict[str, str], sqs_client: Any, tmp_path: Any
) -> None:
    # GIVEN the largest bodies the queue takes (not JSON, and valid events with a huge field), bodies
    # of 256 KiB and of just under the limit, among ordinary logins
    queue_url = etl_env["SQS_QUEUE_URL"]
    largest = largest_body(sqs_client, queue_url)
    marker = f"MARK{uuid.uuid4().hex}"
    bodies: list[str] = []
    for n in range(120):
        kind = n % 6
        if kind == 0:
            bodies.append(not_json_of_size(largest, f"{marker}-{n}"))
        elif kind == 1:
            bodies.append(event_of_size(n, largest, f"{marker}-{n}"))
        elif kind == 2:
            bodies.append(not_json_of_size(262_144, f"{marker}-{n}"))
        elif kind == 3:
            bodies.append(not_json_of_size(DEFAULT_MAX_BODY_BYTES - 10, f"{marker}-{n}"))  # stored whole
        else:
            bodies.append(login(n))
    ids = send_all(sqs_client, queue_url, bodies)
    # WHEN the ETL drains it with the smallest bound allowed (one full receive of 1 MiB bodies)
    process = start_etl(tmp_path, "-v", "--max-bytes-in-hand", "10MiB")
    assert process.wait(timeout=300) == 0, output(tmp_path)[-3000:]
    # THEN every message is stored or quarantined exactly once, and the queue is empty
    database_url = etl_env["DATABASE_URL"]
    assert queue_counts(sqs_client, queue_url) == (0, 0)
    assert_exactly_once(database_url, ids)
    loaded = {r[0] for r in query(database_url, "SELECT message_id FROM user_logins")}
    assert loaded == {ids[n] for n in range(120) if n % 6 >= 4}
    quarantined = rejections(database_url)
    for n, message_id in enumerate(ids):
        if n % 6 in (0, 1, 2):
            reason, encrypted = quarantined[message_id]
            assert reason.startswith(f"body too large: {len(bodies[n])} bytes") and len(encrypted) < 8192
        elif n % 6 == 3:
            assert quarantined[message_id][0].startswith("body is not valid JSON")
    # and no body, nor any part of one, reached the output
    logs = output(tmp_path)
    assert marker not in logs and marker not in dump_schema(database_url)


def sqs_record(body: str) -> dict[str, Any]:
    """One record of an SQS event as the event source mapping delivers it (the fields the handler reads)."""
    return {
        "messageId": str(uuid.uuid4()),
        "receiptHandle": f"AQEB{uuid.uuid4().hex}",
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(int(time.time() * 1000) - 5000)},
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(body.encode()).hexdigest(),  # noqa: S324 - SQS's own checksum
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-2:123456789012:login-queue",
        "awsRegion": "us-east-2",
    }


def test_the_lambda_handler_applies_the_same_size_policy(
    monkeypatch: pytest.MonkeyPatch, database_url: str, masking_key: str
) -> None:
    # GIVEN the function's environment with MAX_BODY_BYTES lowered, and a cold module
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("MASKING_KEY", masking_key)
    monkeypatch.setenv("MAX_BODY_BYTES", "2KiB")
    monkeypatch.delenv("DATABASE_SECRET_ARN", raising=False)
    monkeypatch.setattr(lambda_handler, "_handler", None)
    small, large = sqs_record(login(1)), sqs_record(login(2, extra="z" * 3000))
    try:
        # WHEN it handles a batch with an event over that limit
        response = lambda_handler.handler({"Records": [small, large]}, None)
    finally:
        if lambda_handler._handler is not None:
            lambda_handler._handler.writer.close()
    # THEN that record is quarantined as too large, not reported for retry; the other is loaded
    assert response == {"batchItemFailures": []}
    assert [r[0] for r in query(database_url, "SELECT message_id FROM user_logins")] == [small["messageId"]]
    (reason,) = [r[0] for r in query(database_url, "SELECT reason FROM user_logins_rejected")]
    assert reason.startswith(f"body too large: {len(large['body'])} bytes, limit 2048")
    assert json.loads(small["body"])["ip"] not in reason
