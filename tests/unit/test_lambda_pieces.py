"""The Lambda handler's pure parts: reading an SQS event, the partial batch response, the connect
timeout, the DSN from a secret, JSON log lines. The handler itself: tests/integration/test_lambda_handler.py."""

from __future__ import annotations

import json
import logging
from io import StringIO

import pytest

from aws.lambda_event import EventError, batch_response, messages_of
from config import ConfigError, database_url_with_secret, parse_connection_string
from database.sqs_postgres import PostgresWriter
from lambda_handler import MAX_CONNECT_TIMEOUT_SECONDS, MIN_CONNECT_TIMEOUT_SECONDS, SqsBatchHandler, use_json_lines
from pii.masking import Masker, decode_key, generate_key


def record(**changes: object) -> dict[str, object]:
    return {
        "messageId": "m-1",
        "receiptHandle": "AQEB1",
        "body": "{}",
        "eventSource": "aws:sqs",
        "attributes": {"ApproximateReceiveCount": "3", "SentTimestamp": "1545082649183"},
        **changes,
    }


class Context:
    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def test_an_sqs_record_becomes_a_received_message_with_its_sent_time_and_receive_count() -> None:
    (message,) = messages_of({"Records": [record()]})
    assert (message.message_id, message.receipt_handle, message.body) == ("m-1", "AQEB1", "{}")
    assert (message.sent_timestamp_ms, message.receive_count) == (1545082649183, 3)


def test_a_record_without_attributes_counts_as_a_first_undated_delivery() -> None:
    (message,) = messages_of({"Records": [record(attributes={"SentTimestamp": "soon"})]})
    assert (message.sent_timestamp_ms, message.receive_count) == (None, 1)


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"Records": "x"},
        {"Records": [record(eventSource="aws:kinesis")]},
        {"Records": [record(messageId=None)]},
        {"Records": [record(body=7)]},
    ],
)
def test_an_event_that_is_not_an_sqs_batch_is_refused_whole(event: dict[str, object]) -> None:
    with pytest.raises(EventError):
        messages_of(event)


def test_the_batch_response_names_each_failed_message_once_in_order() -> None:
    assert batch_response(["b", "a", "b"]) == {"batchItemFailures": [{"itemIdentifier": "b"}, {"itemIdentifier": "a"}]}
    assert batch_response([]) == {"batchItemFailures": []}


@pytest.mark.parametrize(
    ("remaining_ms", "expected"),
    [(900_000, MAX_CONNECT_TIMEOUT_SECONDS), (9_000, 3), (1_000, MIN_CONNECT_TIMEOUT_SECONDS)],
)
def test_the_connect_timeout_is_a_third_of_the_time_left_within_bounds(remaining_ms: int, expected: int) -> None:
    handler = SqsBatchHandler(PostgresWriter("postgresql://h/db"), Masker(decode_key(generate_key())))
    assert handler.connect_timeout(Context(remaining_ms)) == expected
    assert handler.connect_timeout(None) == MAX_CONNECT_TIMEOUT_SECONDS


def test_an_rds_credentials_secret_supplies_user_and_password_over_database_url() -> None:
    secret = json.dumps({"username": "etl", "password": "p'w \\x", "engine": "postgres"})
    dsn = database_url_with_secret("host=db.internal dbname=logins sslmode=verify-full", secret)
    assert parse_connection_string(dsn) == {
        "host": "db.internal",
        "dbname": "logins",
        "sslmode": "verify-full",
        "user": "etl",
        "password": "p'w \\x",
    }


def test_an_rds_secret_with_host_needs_no_database_url_and_a_dsn_secret_is_used_as_it_is() -> None:
    secret = json.dumps({"username": "etl", "password": "pw", "host": "h", "port": 5433, "dbname": "d"})
    assert parse_connection_string(database_url_with_secret(None, secret)) == {
        "user": "etl",
        "password": "pw",
        "host": "h",
        "port": "5433",
        "dbname": "d",
    }
    assert database_url_with_secret("host=ignored", "postgresql://u:pw@h/d") == "postgresql://u:pw@h/d"


@pytest.mark.parametrize(
    "secret",
    ['{"username": "etl", "password": "hunter2"', '{"password": "hunter2"}', "postgresql://u:hunter2@h:notaport%zz/d"],
)
def test_a_bad_secret_is_a_config_error_that_never_quotes_it(secret: str) -> None:
    with pytest.raises(ConfigError) as raised:
        database_url_with_secret(None, secret)
    assert "hunter2" not in str(raised.value)


def test_use_json_lines_makes_every_handler_write_one_json_object_per_line() -> None:
    target = logging.getLogger("test_lambda_pieces.json")
    target.propagate = False
    stream = StringIO()
    target.addHandler(logging.StreamHandler(stream))
    use_json_lines(target, "debug")
    target.debug("loaded %d", 3, extra={"count": 3, "aws_request_id": "r-1", "body": "never shown"})
    (line,) = stream.getvalue().splitlines()
    data = json.loads(line)
    assert (data["level"], data["message"], data["count"], data["aws_request_id"]) == ("DEBUG", "loaded 3", 3, "r-1")
    assert "body" not in data and target.level == logging.DEBUG


def test_the_lambda_function_never_builds_token_indexes() -> None:
    # An invocation has seconds and one connection; the ETL replicas or the nightly job build the
    # analysts' token indexes (docs/lambda.md): loading the handler must not load the indexer.
    import subprocess
    import sys
    from pathlib import Path

    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, lambda_handler; print('database.token_indexes' in sys.modules)"],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert loaded == "False"
