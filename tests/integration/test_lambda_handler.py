"""The Lambda handler (lambda_handler.py) invoked in-process, as the Lambda runtime calls it, with SQS
events shaped like AWS's sample event, against the real PostgreSQL (a fresh schema per test).

What AWS does around it (polling, deleting the records not reported, redelivery) is not emulated:
each test hands the handler the event a delivery would carry and checks the response and the tables.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import lambda_handler
from config import Settings
from database.sqs_postgres import PostgresWriter
from etl.observability import JsonFormatter
from helpers import (
    TEST_KMS_ENDPOINT,
    TEST_SQS_ENDPOINT,
    emulator_client,
    locked_logins,
    login,
    pii_values,
    query,
    send,
    unavailable,
)
from lambda_handler import SqsBatchHandler
from pii.keys import generate_wrapped_key
from pii.masking import Masker, decode_key
from proxy import TcpProxy, blackhole_unavailable
from tests.fakes import FirstCallFails

QUEUE_ARN = "arn:aws:sqs:us-east-2:123456789012:login-queue"
ROOT = Path(__file__).resolve().parents[2]
SENT_MS = int(time.time() * 1000) - 5_000  # sent a few seconds ago: today's partition


def sqs_record(
    body: str, *, message_id: str | None = None, receive_count: int = 1, sent_ms: int = SENT_MS
) -> dict[str, Any]:
    """One record as the event source mapping delivers it (AWS's sample SQS event, field for field)."""
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": f"AQEB{uuid.uuid4().hex}",
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": str(receive_count),
            "SentTimestamp": str(sent_ms),
            "SenderId": "AIDAIENQZJOLO23YVJ4VO",
            "ApproximateFirstReceiveTimestamp": str(sent_ms + 2),
        },
        "messageAttributes": {},
        "md5OfBody": hashlib.md5(body.encode()).hexdigest(),  # noqa: S324 - SQS's own checksum
        "eventSource": "aws:sqs",
        "eventSourceARN": QUEUE_ARN,
        "awsRegion": "us-east-2",
    }


def sqs_event(*records: dict[str, Any]) -> dict[str, Any]:
    return {"Records": list(records)}


class FakeContext:
    """The attributes of the Lambda context object the handler uses."""

    aws_request_id = "c6af9ac6-7b61-11e6-9a41-93e812345678"
    function_name = "login-etl"

    def __init__(self, remaining_ms: int = 60_000) -> None:
        self._remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self._remaining_ms


class RunningContext(FakeContext):
    """A context whose remaining time runs down with the clock, as the Lambda runtime's does."""

    def __init__(self, timeout_ms: int) -> None:
        super().__init__(timeout_ms)
        self._deadline = time.monotonic() + timeout_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def invoke_before_the_timeout(handler: SqsBatchHandler, event: dict[str, Any], context: RunningContext) -> Any:
    """handler.handle(event, context) as the runtime runs it; fail if it is still running when the
    context's time is up (the runtime would end the invocation there). Returns the response and the
    milliseconds left when it returned."""
    done: dict[str, Any] = {}

    def invoke() -> None:
        done["response"] = handler.handle(event, context)
        done["left_ms"] = context.get_remaining_time_in_millis()

    thread = threading.Thread(target=invoke, daemon=True)
    thread.start()
    thread.join(timeout=context.get_remaining_time_in_millis() / 1000 + 2)
    assert not thread.is_alive(), "the invocation was still running when its function timeout came"
    return done["response"], done["left_ms"]


def failures(response: dict[str, Any]) -> list[str]:
    assert set(response) == {"batchItemFailures"}
    return [item["itemIdentifier"] for item in response["batchItemFailures"]]


def stored(database_url: str) -> tuple[list[str], list[str]]:
    logins = [r[0] for r in query(database_url, "SELECT message_id FROM user_logins ORDER BY message_id")]
    rejected = [r[0] for r in query(database_url, "SELECT message_id FROM user_logins_rejected ORDER BY message_id")]
    return logins, rejected


def with_port(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    return parts._replace(netloc=f"{parts.hostname}:{port}").geturl()


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch, database_url: str, masking_key: str) -> Iterator[dict[str, str]]:
    """The function's environment (DATABASE_URL, MASKING_KEY) and a cold module: no environment kept."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "SQS_", "DATABASE_", "MASKING_KEY", "DLQ_")):
            monkeypatch.delenv(name)
    env = {"DATABASE_URL": database_url, "MASKING_KEY": masking_key}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(lambda_handler, "_handler", None)
    yield env
    if lambda_handler._handler is not None:
        lambda_handler._handler.writer.close()


@pytest.fixture
def make_handler(database_url: str, masking_key: str) -> Iterator[Any]:
    """Build an SqsBatchHandler on this test's schema with a given masker (and DSN); closed afterwards."""
    made: list[SqsBatchHandler] = []

    def make(
        masker: Masker | None = None, dsn: str = database_url, writer: PostgresWriter | None = None, **options: Any
    ) -> SqsBatchHandler:
        handler = SqsBatchHandler(writer or PostgresWriter(dsn), masker or Masker(decode_key(masking_key)), **options)
        made.append(handler)
        return handler

    yield make
    for handler in made:
        handler.writer.close()


def test_a_batch_with_malformed_bodies_quarantines_them_and_reports_no_record_for_retry(
    lambda_env: dict[str, str], masking_key: str
) -> None:
    good = [sqs_record(login(n)) for n in range(3)]
    bad = [sqs_record("not json {"), sqs_record(json.dumps({"user_id": "u"})), sqs_record('["a list"]')]
    response = lambda_handler.handler(sqs_event(*good[:2], *bad, good[2]), FakeContext())
    assert failures(response) == []  # a malformed body reported would only loop into the DLQ
    logins, rejected = stored(lambda_env["DATABASE_URL"])
    assert logins == sorted(r["messageId"] for r in good)
    assert rejected == sorted(r["messageId"] for r in bad)
    # The same core as the poller: tokens of the same cipher, unmasked by the same key.
    masker = Masker(decode_key(masking_key))
    (token,) = query(
        lambda_env["DATABASE_URL"], "SELECT masked_ip FROM user_logins WHERE message_id = %s", (good[0]["messageId"],)
    )[0]
    assert masker.unmask(token) == json.loads(good[0]["body"])["ip"]


def test_the_same_event_delivered_twice_is_stored_once(lambda_env: dict[str, str]) -> None:
    records = [sqs_record(login(n)) for n in range(4)] + [sqs_record("{broken")]
    assert failures(lambda_handler.handler(sqs_event(*records), FakeContext())) == []
    again = [
        {
            **r,
            "receiptHandle": f"AQEB{uuid.uuid4().hex}",
            "attributes": {**r["attributes"], "ApproximateReceiveCount": "2"},
        }
        for r in records
    ]
    assert failures(lambda_handler.handler(sqs_event(*again), FakeContext())) == []
    logins, rejected = stored(lambda_env["DATABASE_URL"])
    assert logins == sorted(r["messageId"] for r in records[:4])
    assert rejected == [records[4]["messageId"]]


def test_postgresql_unreachable_reports_every_record_and_stores_nothing_until_it_is_back(
    database_url: str, make_handler: Any
) -> None:
    proxy = TcpProxy("127.0.0.1", urlsplit(database_url).port or 5432)
    try:
        handler = make_handler(dsn=with_port(database_url, proxy.port))
        first = sqs_record(login(0))
        assert failures(handler.handle(sqs_event(first), FakeContext())) == []
        proxy.cut()
        records = [sqs_record(login(n)) for n in range(1, 4)] + [sqs_record("nope")]
        response = handler.handle(sqs_event(*records), FakeContext())
        assert failures(response) == [r["messageId"] for r in records]
        assert stored(database_url) == ([first["messageId"]], [])
        proxy.restore()  # AWS delivers the batch again: the connection is opened anew
        assert failures(handler.handle(sqs_event(*records), FakeContext())) == []
        assert stored(database_url) == (
            sorted([first["messageId"], *(r["messageId"] for r in records[:3])]),
            [records[3]["messageId"]],
        )
    finally:
        proxy.close()


def test_a_cold_start_with_postgresql_unreachable_reports_every_record(database_url: str, make_handler: Any) -> None:
    proxy = TcpProxy("127.0.0.1", urlsplit(database_url).port or 5432)
    try:
        proxy.cut()  # connections are accepted and closed at once
        handler = make_handler(dsn=with_port(database_url, proxy.port))
        records = [sqs_record(login(n)) for n in range(3)]
        response = handler.handle(sqs_event(*records), FakeContext(remaining_ms=3_000))
        assert failures(response) == [r["messageId"] for r in records]
        assert not handler.writer.connected
    finally:
        proxy.close()
    assert query(database_url, "SELECT to_regclass('user_logins')") == [(None,)]  # nothing was written


# The template's shortest function timeout (FunctionTimeoutSeconds); "in time" leaves this much of it.
FUNCTION_TIMEOUT_MS = 30_000
TIME_TO_SPARE_MS = 5_000


def test_postgresql_black_holed_reports_every_record_well_within_the_function_timeout(
    database_url: str, make_handler: Any
) -> None:
    reason = blackhole_unavailable()
    if reason is not None:
        unavailable(f"a network black hole needs {reason}")
    proxy = TcpProxy.private("127.0.0.1", urlsplit(database_url).port or 5432)
    try:
        # GIVEN an environment whose kept connection crosses a network that then drops every packet
        handler = make_handler(dsn=proxy.dsn(database_url))
        first = sqs_record(login(0))
        assert failures(handler.handle(sqs_event(first), FakeContext())) == []
        proxy.blackhole()
        # WHEN the next batch comes
        records = [sqs_record(login(n)) for n in range(1, 4)]
        response, left_ms = invoke_before_the_timeout(handler, sqs_event(*records), RunningContext(FUNCTION_TIMEOUT_MS))
    finally:
        proxy.close()
    # THEN every record is reported for retry, with time to spare, and nothing more is stored
    assert failures(response) == [r["messageId"] for r in records]
    assert left_ms >= TIME_TO_SPARE_MS
    assert stored(database_url) == ([first["messageId"]], [])


def test_a_write_waiting_on_a_lock_is_cancelled_and_reported_well_within_the_function_timeout(
    database_url: str, make_handler: Any
) -> None:
    # GIVEN an environment with its connection kept, and an analyst holding a lock on user_logins
    handler = make_handler()
    first = sqs_record(login(0))
    assert failures(handler.handle(sqs_event(first), RunningContext(FUNCTION_TIMEOUT_MS))) == []
    records = [sqs_record(login(n)) for n in range(1, 4)]
    with locked_logins(database_url):
        # WHEN the next batch comes, its write waits for the lock
        response, left_ms = invoke_before_the_timeout(handler, sqs_event(*records), RunningContext(FUNCTION_TIMEOUT_MS))
    # THEN statement_timeout cancels the wait: every record reported, with time to spare, none stored
    assert failures(response) == [r["messageId"] for r in records]
    assert left_ms >= TIME_TO_SPARE_MS
    assert stored(database_url) == ([first["messageId"]], [])


def test_a_connection_broken_between_invocations_is_opened_again_without_failing_the_batch(
    database_url: str, pg_admin_url: str, make_handler: Any
) -> None:
    name = f"lambda-test-{uuid.uuid4().hex[:12]}"  # only this test's session is ended, no one else's
    handler = make_handler(writer=PostgresWriter(database_url, application_name=name))
    assert failures(handler.handle(sqs_event(sqs_record(login(0))), FakeContext())) == []
    # While the environment is frozen, PostgreSQL ends the session (a restart, a failover, an idle timeout).
    terminated = query(
        pg_admin_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (name,)
    )
    assert terminated == [(True,)]
    records = [sqs_record(login(n)) for n in range(1, 3)]
    assert failures(handler.handle(sqs_event(*records), FakeContext())) == []
    assert len(stored(database_url)[0]) == 3


def test_only_the_record_whose_processing_raised_is_reported(
    masking_key: str, database_url: str, make_handler: Any
) -> None:
    held: list[Any] = []

    class Spy:  # the outage backoff is for the database's failures, not a record's own
        def hold(self, messages: Any, arn: str) -> int:
            held.append(messages)
            return 0

    handler = make_handler(
        FirstCallFails(decode_key(masking_key)), outage_backoff=Spy()
    )  # masking the first record raises
    records = [sqs_record(login(n)) for n in range(4)]
    response = handler.handle(sqs_event(*records), FakeContext())
    assert failures(response) == [records[0]["messageId"]]
    assert stored(database_url) == (sorted(r["messageId"] for r in records[1:]), [])
    assert held == []  # it comes back at the queue's visibility timeout, towards the poison rule


def test_a_record_that_raised_on_its_last_receive_before_the_dlq_is_quarantined_not_reported(
    masking_key: str, database_url: str, make_handler: Any
) -> None:
    handler = make_handler(FirstCallFails(decode_key(masking_key)), max_receive_count=5)
    looping = sqs_record(login(0), receive_count=4)  # the DLQ would take it after its 5th receive
    response = handler.handle(sqs_event(looping, sqs_record(login(1))), FakeContext())
    assert failures(response) == []
    (reason,) = query(
        database_url, "SELECT reason FROM user_logins_rejected WHERE message_id = %s", (looping["messageId"],)
    )[0]
    assert reason == "processing failed 4 times: RuntimeError"


def test_no_raw_pii_reaches_the_database_or_the_logs(
    lambda_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    bodies = [login(n) for n in range(5)] + [
        login(5, user_id=7),  # wrong type: quarantined, its body holds an ip and a device_id
        json.dumps({"ip": "203.0.113.77", "device_id": "leak-me-1234"}) + "x",  # not JSON at all
    ]
    lines = StringIO()
    json_lines = logging.StreamHandler(lines)
    json_lines.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(json_lines)
    caplog.set_level(logging.DEBUG)
    try:
        records = [sqs_record(b) for b in bodies]
        response = lambda_handler.handler(sqs_event(*records), FakeContext())
        lambda_handler.handler(sqs_event(*records[4:]), FakeContext())  # delivered again: duplicates
    finally:
        logging.getLogger().removeHandler(json_lines)
    assert failures(response) == []
    secrets = pii_values(bodies) | {"203.0.113.77", "leak-me-1234", lambda_env["MASKING_KEY"]}
    dump = "\n".join(
        str(row)
        for table in ("user_logins", "user_logins_rejected")
        for row in query(lambda_env["DATABASE_URL"], f"SELECT * FROM {table}")
    )
    assert len(dump.splitlines()) == 7  # every message was stored, as tokens or encrypted
    logs = caplog.text + lines.getvalue()
    assert "quarantined" in logs or "rejected" in logs
    for line in lines.getvalue().splitlines():
        json.loads(line)  # JSON lines, one object each
    for value in secrets:
        assert value not in dump
        assert value not in logs


def test_keys_are_loaded_once_per_cold_start_and_one_connection_serves_every_invocation(
    lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[int] = []
    real_load = Settings.load_masker

    def counting_load(self: Settings) -> Masker:
        loads.append(1)
        return real_load(self)

    monkeypatch.setattr(Settings, "load_masker", counting_load)
    sessions = set()
    for n in range(3):
        assert failures(lambda_handler.handler(sqs_event(sqs_record(login(n))), FakeContext())) == []
        assert lambda_handler._handler is not None
        conn = lambda_handler._handler.writer._conn
        assert conn is not None
        sessions.add(conn.get_backend_pid())
    assert len(loads) == 1
    assert len(sessions) == 1  # one PostgreSQL session, opened by the first invocation, kept
    assert len(stored(lambda_env["DATABASE_URL"])[0]) == 3


def test_a_failed_cold_start_raises_and_the_next_invocation_tries_again(
    lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MASKING_KEY", "too-short")
    with pytest.raises(Exception, match="MASKING_KEY is malformed"):
        lambda_handler.handler(sqs_event(sqs_record(login(0))), FakeContext())
    assert "too-short" not in caplog.text
    assert lambda_handler._handler is None
    monkeypatch.setenv("MASKING_KEY", lambda_env["MASKING_KEY"])
    assert failures(lambda_handler.handler(sqs_event(sqs_record(login(0))), FakeContext())) == []


def test_a_cold_start_as_deployed_reads_the_dsn_from_secrets_manager_and_unwraps_the_key_with_kms(
    lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The template's configuration: DATABASE_SECRET_ARN (RDS credentials JSON) over a password-less
    DATABASE_URL, and a KMS-wrapped key; Secrets Manager and KMS are the moto emulator."""
    clients = {name: emulator_client(name, TEST_KMS_ENDPOINT) for name in ("kms", "secretsmanager")}
    try:
        key_id = clients["kms"].create_key(Description="login-etl lambda test")["KeyMetadata"]["Arn"]
    except Exception as exc:  # noqa: BLE001 - any failure means: no emulator
        unavailable(f"the KMS / Secrets Manager emulator at {TEST_KMS_ENDPOINT} ({type(exc).__name__})")
    password = f"pw-{uuid.uuid4().hex}"  # trust auth ignores it; it must never be shown
    secret = clients["secretsmanager"].create_secret(
        Name=f"login-etl-{uuid.uuid4().hex}", SecretString=json.dumps({"username": "postgres", "password": password})
    )
    for name, value in {
        "AWS_ENDPOINT_URL_KMS": TEST_KMS_ENDPOINT,
        "AWS_ENDPOINT_URL_SECRETS_MANAGER": TEST_KMS_ENDPOINT,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "DATABASE_SECRET_ARN": secret["ARN"],
        "MASKING_KEY_KMS_KEY_ID": key_id,
        "MASKING_KEY_KMS_CIPHERTEXT": generate_wrapped_key(key_id, region="us-east-1", client=clients["kms"]),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASKING_KEY")
    caplog.set_level(logging.DEBUG)
    for noisy in ("botocore", "boto3", "urllib3"):  # as use_json_lines sets them in Lambda: botocore's
        caplog.set_level(logging.WARNING, logger=noisy)  # DEBUG lines hold response bodies, the secret's too
    records = [sqs_record(login(n)) for n in range(2)]
    assert failures(lambda_handler.handler(sqs_event(*records), FakeContext())) == []
    assert stored(lambda_env["DATABASE_URL"])[0] == sorted(r["messageId"] for r in records)
    assert password not in caplog.text


# --- a database outage on Lambda: the redrive policy in force --------------------------------------


def mapping_record(message: dict[str, Any], queue_arn: str) -> dict[str, Any]:
    """A message as ReceiveMessage returned it, as the event source mapping hands it to the function."""
    return {
        "messageId": message["MessageId"],
        "receiptHandle": message["ReceiptHandle"],
        "body": message["Body"],
        "attributes": dict(message.get("Attributes", {})),
        "messageAttributes": {},
        "md5OfBody": message["MD5OfBody"],
        "eventSource": "aws:sqs",
        "eventSourceARN": queue_arn,
        "awsRegion": "us-east-1",
    }


@dataclass
class MappingRun:
    """What the emulated event source mapping saw: each message's receives, (monotonic time, count)."""

    receives: dict[str, list[tuple[float, int]]]


def run_mapping(
    sqs: Any, queue_url: str, handler: SqsBatchHandler, *, until: Callable[[], bool], seconds: float
) -> MappingRun:
    """What an SQS event source mapping does, against the real queue: receive up to 10, invoke the
    handler, delete the records it did not report; until `until()` or `seconds` have passed."""
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    receives: dict[str, list[tuple[float, int]]] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        messages = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageSystemAttributeNames=["All"]
        ).get("Messages", [])
        if not messages:
            continue
        now = time.monotonic()
        for m in messages:
            receives.setdefault(m["MessageId"], []).append((now, int(m["Attributes"]["ApproximateReceiveCount"])))
        response = handler.handle(sqs_event(*(mapping_record(m, queue_arn) for m in messages)), FakeContext())
        reported = set(failures(response))
        done = [m for m in messages if m["MessageId"] not in reported]
        if done:
            sqs.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
            )
    return MappingRun(receives)


@pytest.fixture
def queue_with_dlq(sqs_client: Any) -> Iterator[tuple[str, str]]:
    """A uuid-named queue (visibility timeout 3 s) whose RedrivePolicy dead-letters after 4 receives."""
    name = f"test-{uuid.uuid4().hex}"
    dlq = sqs_client.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    dlq_arn = sqs_client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(OUTAGE_MAX_RECEIVES)})
    attributes = {"VisibilityTimeout": str(OUTAGE_QUEUE_VISIBILITY_SECONDS), "RedrivePolicy": redrive}
    url = sqs_client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    yield url, dlq
    sqs_client.delete_queue(QueueUrl=url)
    sqs_client.delete_queue(QueueUrl=dlq)


OUTAGE_MAX_RECEIVES = 4
# Seconds for minutes: delays of 3, 6, 12 s after receives 1, 2, 3, so outage_bound_seconds(4) = 21 s.
OUTAGE_BASE_SECONDS, OUTAGE_CAP_SECONDS = 3, 12
# The queue's own visibility timeout: what a record waits without the backoff, and the time the
# handler has to change it (AWS's is 6 x the function timeout; a loaded test machine needs ~1 s).
OUTAGE_QUEUE_VISIBILITY_SECONDS = 3


def dead_letters(sqs: Any, dlq: str) -> int:
    attributes = sqs.get_queue_attributes(
        QueueUrl=dlq, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]) + int(attributes["ApproximateNumberOfMessagesNotVisible"])


@pytest.mark.parametrize("backoff", [True, False], ids=["with the outage backoff", "without it (the control)"])
def test_a_database_outage_shorter_than_the_bound_sends_no_valid_message_to_the_dlq(
    backoff: bool,
    database_url: str,
    make_handler: Any,
    sqs_client: Any,
    queue_with_dlq: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aws.outage_backoff import OutageBackoff, outage_bound_seconds

    # GIVEN a queue that dead-letters after 4 receives at a 3 s visibility timeout, 6 logins in it,
    # and the handler behind a proxy to PostgreSQL, cut for 12 s (below the 21 s bound)
    queue_url, dlq = queue_with_dlq
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    bound = outage_bound_seconds(OUTAGE_MAX_RECEIVES, base=OUTAGE_BASE_SECONDS, cap=OUTAGE_CAP_SECONDS)
    outage = 12.0
    assert bound == 21 and outage < bound
    sent = send(sqs_client, queue_url, [login(n) for n in range(6)])
    proxy = TcpProxy("127.0.0.1", urlsplit(database_url).port or 5432)
    try:
        handler = make_handler(
            dsn=with_port(database_url, proxy.port),
            max_receive_count=OUTAGE_MAX_RECEIVES,
            outage_backoff=OutageBackoff(
                region="us-east-1",
                endpoint_url=TEST_SQS_ENDPOINT,
                base_seconds=OUTAGE_BASE_SECONDS,
                cap_seconds=OUTAGE_CAP_SECONDS,
            )
            if backoff
            else None,
        )
        warm = sqs_record(login(99))  # a first invocation: the environment's connection, the schema
        assert failures(handler.handle(sqs_event(warm), FakeContext())) == []
        # WHEN the mapping runs through the outage, then until every message is stored or dead-lettered
        proxy.cut()
        # (without the backoff: until every message is dead-lettered, within the bound; at a 3 s
        # visibility timeout that takes ~13 s, more on a loaded machine)
        during = run_mapping(
            sqs_client,
            queue_url,
            handler,
            until=lambda: not backoff and dead_letters(sqs_client, dlq) >= len(sent),
            seconds=outage if backoff else bound,
        )
        proxy.restore()
        after = run_mapping(
            sqs_client,
            queue_url,
            handler,
            until=lambda: len(stored(database_url)[0]) - 1 + dead_letters(sqs_client, dlq) >= len(sent),
            seconds=30,
        )
    finally:
        proxy.close()
    counts = {m: [c for _, c in during.receives.get(m, []) + after.receives.get(m, [])] for m in sent}
    if not backoff:
        # THEN, without it, the receives run out within an outage shorter than the bound and SQS
        # dead-letters every message
        assert dead_letters(sqs_client, dlq) == len(sent), counts
        assert stored(database_url) == ([warm["messageId"]], [])
        return
    # THEN nothing reached the DLQ and every message is stored once, at its 4th receive at the latest
    assert dead_letters(sqs_client, dlq) == 0, counts
    assert stored(database_url) == (sorted([*sent, warm["messageId"]]), [])
    for message_id, seen in counts.items():
        assert seen == list(range(1, len(seen) + 1)) and len(seen) <= OUTAGE_MAX_RECEIVES, (message_id, seen)
    # and each receive during the outage came no sooner than the delay its receive count earned
    for message_id, times in during.receives.items():
        for (t1, n), (t2, _) in zip(times, times[1:], strict=False):
            assert t2 - t1 >= min(OUTAGE_CAP_SECONDS, OUTAGE_BASE_SECONDS * 2 ** (n - 1)) - 0.3, (message_id, times)
    assert max(len(seen) for seen in counts.values()) >= 3  # the outage did cost receives


def runbook_block(heading: str) -> str:
    """The ```bash block under `heading` in docs/lambda.md."""
    text = (ROOT / "docs" / "lambda.md").read_text()
    section = text[text.index(heading) :]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start : section.index("```", start)]


def test_the_dead_letter_runbook_moves_every_message_back_and_the_function_then_stores_each_once(
    database_url: str, make_handler: Any, sqs_client: Any, queue_with_dlq: tuple[str, str], tmp_path: Any
) -> None:
    aws = shutil.which("aws")
    if aws is None:
        unavailable("the aws CLI (awscli in requirements-dev.txt)")
    # GIVEN three logins the redrive policy moved to the dead-letter queue (4 receives, none deleted)
    queue_url, dlq = queue_with_dlq
    sent = send(sqs_client, queue_url, [login(n) for n in range(3)])
    deadline = time.monotonic() + 30
    while dead_letters(sqs_client, dlq) < len(sent):
        assert time.monotonic() < deadline, dead_letters(sqs_client, dlq)
        sqs_client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    arn = {
        name: sqs_client.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        for name, url in (("QUEUE_ARN", queue_url), ("DLQ_ARN", dlq))
    }
    # WHEN the runbook's commands run, as written, with the CLI pointed at the emulator
    script = f'aws() {{ "{aws}" --endpoint-url "{TEST_SQS_ENDPOINT}" "$@"; }}\nset -euo pipefail\n' + runbook_block(
        "## Moving messages back from the dead-letter queue"
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "DLQ_URL": dlq,
        **arn,
    }
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "3"  # step 1: how many wait
    deadline = time.monotonic() + 30
    while (task := sqs_client.list_message_move_tasks(SourceArn=arn["DLQ_ARN"])["Results"][0])["Status"] != "COMPLETED":
        assert time.monotonic() < deadline and task["Status"] == "RUNNING", task
        time.sleep(0.5)
    # THEN the dead-letter queue is empty, and the mapping stores every message once
    assert dead_letters(sqs_client, dlq) == 0
    handler = make_handler(max_receive_count=OUTAGE_MAX_RECEIVES)

    def all_stored() -> bool:
        return bool(query(database_url, "SELECT to_regclass('user_logins') IS NOT NULL")[0][0]) and len(
            stored(database_url)[0]
        ) >= len(sent)

    run_mapping(sqs_client, queue_url, handler, until=all_stored, seconds=20)
    assert stored(database_url) == (sorted(sent), [])
    assert sqs_client.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages", []) == []
