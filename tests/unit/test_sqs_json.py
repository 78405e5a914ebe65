"""aws/sqs_json.py beside botocore: the same bytes, the same signature, the same error codes and outcomes.

No network: botocore's request is caught at `before-send` and answered there; the transport's
exchange is replaced by a function that records the request and returns a canned answer.
"""

from __future__ import annotations

import datetime
import http.client
import io
import json
import logging
import pathlib
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.auth
import botocore.handlers
import botocore.validate
import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSPreparedRequest, AWSRequest, AWSResponse
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError, HTTPClientError

import config
from aws.http_answer import Answer, parse_fields
from aws.sqs import TRANSPORTS, QueueUnusable, SqsReader, SqsUnavailable
from aws.sqs_json import JsonTransport, _Request, _request_head, _Signer
from models import ReceivedMessage
from tests.fakes import Room

ENDPOINT = "http://localhost:4566"
QUEUE_URL = f"{ENDPOINT}/000000000000/login-queue"
FROZEN = datetime.datetime(2026, 12, 6, 12, 0, 0)
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    (
        "ReceiveMessage",
        {
            "QueueUrl": QUEUE_URL,
            "MaxNumberOfMessages": 10,
            "WaitTimeSeconds": 20,
            "MessageSystemAttributeNames": ["SentTimestamp", "ApproximateReceiveCount"],
        },
    ),
    (
        "DeleteMessageBatch",
        {"QueueUrl": QUEUE_URL, "Entries": [{"Id": str(i), "ReceiptHandle": f"AQEB{i}/+=é"} for i in range(10)]},
    ),
    (
        "ChangeMessageVisibilityBatch",
        {"QueueUrl": QUEUE_URL, "Entries": [{"Id": "0", "ReceiptHandle": "AQEB0", "VisibilityTimeout": 30}]},
    ),
]
SNAKE = {
    "ReceiveMessage": "receive_message",
    "DeleteMessageBatch": "delete_message_batch",
    "ChangeMessageVisibilityBatch": "change_message_visibility_batch",
}


class Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_kwargs: object) -> Iterator[bytes]:
        yield self.data


@pytest.fixture(autouse=True)
def _credentials_and_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: FROZEN)


def botocore_request(operation: str, params: dict[str, Any], body: bytes | None = None) -> AWSPreparedRequest:
    """The request botocore's own client sends for `operation` (caught before it leaves); with
    `body`, those bytes in place of its serialiser's, put in before botocore signs the request."""
    client = boto3.session.Session(region_name="us-east-1").client(
        "sqs", endpoint_url=ENDPOINT, config=Config(retries={"mode": "standard", "total_max_attempts": 1})
    )
    # Retry bookkeeping headers (amz-sdk-*) carry a fresh uuid each call: signed, they would make
    # two signatures of one request differ. The transport sends none.
    client.meta.events.unregister("request-created", botocore.handlers.add_retry_headers)
    sent: list[AWSPreparedRequest] = []

    def catch(request: AWSPreparedRequest, **_kwargs: object) -> AWSResponse:
        sent.append(request)
        return AWSResponse(request.url, 200, {}, Body(b"{}"))

    def put_body(request: AWSRequest, **_kwargs: object) -> None:
        request.data = body

    if body is not None:
        client.meta.events.register(f"before-sign.sqs.{operation}", put_body)
    client.meta.events.register(f"before-send.sqs.{operation}", catch)
    getattr(client, SNAKE[operation])(**params)
    return sent[0]


def _text(value: str | bytes) -> str:
    """botocore's prepared headers hold bytes or text."""
    return value.decode() if isinstance(value, bytes) else value


def transport(answer: Callable[[bytes, dict[str, str]], tuple[int, dict[str, str], bytes]]) -> JsonTransport:
    made = JsonTransport(
        ENDPOINT,
        "us-east-1",
        boto3.session.Session().get_credentials(),
        connect_timeout_seconds=1,
        read_timeout_seconds=1,
        max_connections=1,
    )

    def exchange(body: bytes, headers: dict[str, str], before_read: object = None) -> tuple[int, dict[str, str], bytes]:
        return answer(body, headers)

    made._exchange = exchange  # type: ignore[method-assign]  # in place of the network
    return made


def sent_by_transport(operation: str, params: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    caught: list[tuple[bytes, dict[str, str]]] = []

    def answer(body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        caught.append((body, headers))
        return 200, {}, b"{}"

    transport(answer).call(operation, params)
    return caught[0]


@pytest.mark.parametrize(("operation", "params"), REQUESTS, ids=[op for op, _ in REQUESTS])
def test_the_transport_sends_botocores_request_and_signature(operation: str, params: dict[str, Any]) -> None:
    """GIVEN the same operation, parameters, credentials and clock WHEN both send it THEN the body
    is the JSON value botocore's serialiser writes (in compact bytes), and botocore's client, sending
    those bytes, sends the same protocol headers and Authorization header, byte for byte."""
    body, headers = sent_by_transport(operation, params)
    assert json.loads(body) == json.loads(botocore_request(operation, params).body)
    theirs = botocore_request(operation, params, body=body)
    assert theirs.body == body
    for name in ("X-Amz-Target", "Content-Type", "x-amzn-query-mode", "X-Amz-Date", "Authorization"):
        assert headers[name] == _text(theirs.headers[name]), name
    assert "SignedHeaders=content-type;host;x-amz-date;x-amz-target;x-amzn-query-mode" in headers["Authorization"]


def test_a_session_token_is_sent_and_signed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Temporary credentials (a role's): the token travels in X-Amz-Security-Token, inside the signature."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-of-a-role")
    operation, params = REQUESTS[0]
    body, headers = sent_by_transport(operation, params)
    theirs = botocore_request(operation, params, body=body)
    assert headers["X-Amz-Security-Token"] == "token-of-a-role"
    assert headers["Authorization"] == _text(theirs.headers["Authorization"])


def test_the_light_request_signs_as_botocores_own_request_object() -> None:
    """The transport hands SigV4Auth a slimmer request object than AWSRequest: the signature is the same."""
    body, headers = sent_by_transport(*REQUESTS[1])
    plain = AWSRequest(
        method="POST",
        url=ENDPOINT + "/",
        data=body,
        headers={name: headers[name] for name in ("Content-Type", "X-Amz-Target", "x-amzn-query-mode")},
    )
    SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"), "sqs", "us-east-1").add_auth(
        plain
    )
    assert plain.headers["Authorization"] == headers["Authorization"]


# -- errors: the same code, the same outcome -------------------------------------------------------

QUERY = "x-amzn-query-error"
# (HTTP status, body, headers) as SQS's JSON API answers, from its API reference ("Common Errors"
# and each operation's "Errors"), plus what a proxy or a broken server may answer.
ERRORS: list[tuple[int, bytes, dict[str, str]]] = [
    (
        400,
        b'{"__type":"com.amazonaws.sqs#QueueDoesNotExist","message":"The specified queue does not exist."}',
        {QUERY: "AWS.SimpleQueueService.NonExistentQueue;Sender"},
    ),
    (400, b'{"__type":"com.amazonaws.sqs#QueueDoesNotExist","message":"gone"}', {}),
    (
        400,
        b'{"__type":"com.amazon.coral.service#AccessDeniedException","message":"no"}',
        {QUERY: "AccessDenied;Sender"},
    ),
    (403, b'{"__type":"com.amazon.coral.service#InvalidClientTokenId","message":"bad key"}', {}),
    (400, b'{"__type":"com.amazon.coral.service#UnrecognizedClientException","message":"bad key"}', {}),
    (403, b'{"__type":"com.amazon.coral.service#SignatureDoesNotMatch","message":"clock?"}', {}),
    (400, b'{"__type":"com.amazon.coral.availability#ThrottlingException","message":"slow down"}', {}),
    (400, b'{"__type":"com.amazonaws.sqs#RequestThrottled","message":"slow"}', {QUERY: "RequestThrottled;Sender"}),
    (400, b'{"__type":"com.amazonaws.sqs#OverLimit","message":"too many in flight"}', {QUERY: "OverLimit;Sender"}),
    (400, b'{"__type":"com.amazonaws.sqs#KmsThrottled","message":"kms"}', {QUERY: "KMS.ThrottlingException;Sender"}),
    (
        400,
        b'{"__type":"com.amazonaws.sqs#KmsAccessDenied","message":"kms"}',
        {QUERY: "KMS.AccessDeniedException;Sender"},
    ),
    (400, b'{"__type":"com.amazonaws.sqs#InvalidAddress","message":"bad url"}', {QUERY: "InvalidAddress;Sender"}),
    (400, b'{"__type":"com.amazonaws.sqs#InvalidSecurity","message":"http"}', {QUERY: "InvalidSecurity;Sender"}),
    (400, b'{"__type":"com.amazonaws.sqs#TooManyEntriesInBatchRequest","message":"11"}', {}),
    (400, b'{"__type":"com.amazonaws.sqs#EmptyBatchRequest","message":"0"}', {}),
    (400, b'{"__type":"com.amazonaws.sqs#BatchEntryIdsNotDistinct","message":"ids"}', {}),
    (400, b'{"__type":"com.amazonaws.sqs#InvalidBatchEntryId","message":"id"}', {}),
    (400, b'{"__type":"com.amazonaws.sqs#UnsupportedOperation","message":"no"}', {}),
    (400, b'{"__type":"com.amazon.coral.validate#ValidationException","message":"bad"}', {}),
    (400, b'{"__type":"com.amazon.coral.service#IncompleteSignature","message":"sig"}', {}),
    (400, b'{"__type":"com.amazon.coral.service#RequestExpired","message":"late"}', {}),
    (500, b'{"__type":"com.amazon.coral.service#InternalFailure","message":"oops"}', {}),
    (503, b'{"__type":"com.amazon.coral.service#ServiceUnavailable","message":"later"}', {}),
    (502, b"<html>Bad Gateway</html>", {"content-type": "text/html"}),
    (503, b"", {}),
    (413, b"Request Entity Too Large", {}),
]


def outcome(call: Callable[[], object]) -> str:
    try:
        call()
    except QueueUnusable:
        return "permanent"
    except SqsUnavailable:
        return "retry"
    return "ok"


def boto3_reader(status: int, body: bytes, headers: dict[str, str]) -> SqsReader:
    reader = SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, transport="boto3")

    def answer(request: AWSPreparedRequest, **_kwargs: object) -> AWSResponse:
        return AWSResponse(request.url, status, headers, Body(body))

    reader.client.meta.events.register("before-send.sqs.*", answer)
    return reader


def json_reader(status: int, body: bytes, headers: dict[str, str]) -> SqsReader:
    reader = SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, transport="json")
    reader._json = transport(lambda _body, _headers: (status, {k.lower(): v for k, v in headers.items()}, body))
    return reader


def calls(reader: SqsReader) -> dict[str, Callable[[], object]]:
    message = ReceivedMessage("m0", "receipt-0", "{}")
    return {
        "receive": reader.receive,
        "delete": lambda: reader.delete([message]),
        "change_visibility": lambda: reader.change_visibility([message], 30),
    }


@pytest.mark.parametrize(("status", "body", "headers"), ERRORS, ids=[f"{s}-{b[:60]!r}" for s, b, _ in ERRORS])
def test_every_error_answer_has_the_same_code_and_outcome_on_both_paths(
    status: int, body: bytes, headers: dict[str, str]
) -> None:
    """GIVEN an error answer WHEN each path gets it for each hot call THEN botocore's error code and
    the reader's outcome (retry or permanent exit) are the same on both."""
    theirs, ours = calls(boto3_reader(status, body, headers)), calls(json_reader(status, body, headers))
    for name in theirs:
        assert outcome(ours[name]) == outcome(theirs[name]) != "ok", name
    with pytest.raises(ClientError) as boto_error:
        boto3_reader(status, body, headers).client.receive_message(QueueUrl=QUEUE_URL)
    with pytest.raises(ClientError) as json_error:
        transport(lambda _b, _h: (status, {k.lower(): v for k, v in headers.items()}, body)).call(
            "ReceiveMessage", {"QueueUrl": QUEUE_URL}
        )
    assert json_error.value.response["Error"]["Code"] == boto_error.value.response["Error"]["Code"]


@pytest.mark.parametrize("code", ["AWS.SimpleQueueService.NonExistentQueue", "AccessDenied", "InvalidClientTokenId"])
def test_a_queue_gone_or_access_refused_is_permanent_on_the_json_path(code: str) -> None:
    """The error table is not vacuous: these end the run (QueueUnusable) on the narrow path too."""
    reader = json_reader(400, b'{"__type":"x#' + code.encode() + b'","message":"m"}', {})
    assert outcome(reader.receive) == "permanent"


def test_refused_entries_are_reported_alike_on_both_paths() -> None:
    """DeleteMessageBatch / ChangeMessageVisibilityBatch answer 200 with Failed entries: the same
    message ids (delete) and receipt handles (visibility) come back as refused on both paths."""
    answer = json.dumps(
        {
            "Successful": [{"Id": "1"}],
            "Failed": [{"Id": "0", "Code": "ReceiptHandleIsInvalid", "SenderFault": True, "Message": "stale"}],
        }
    ).encode()
    messages = [ReceivedMessage("m0", "receipt-0", "{}"), ReceivedMessage("m1", "receipt-1", "{}")]
    for make in (boto3_reader, json_reader):
        reader = make(200, answer, {"content-type": "application/x-amz-json-1.0"})
        assert reader.delete(messages) == ["m0"], make.__name__
        assert reader.change_visibility(messages, 30) == ["receipt-0"], make.__name__


def test_received_messages_are_read_alike_on_both_paths() -> None:
    answer = json.dumps(
        {
            "Messages": [
                {
                    "MessageId": "m0",
                    "ReceiptHandle": "r0",
                    "MD5OfBody": "x",
                    "Body": '{"user_id": "u"}',
                    "Attributes": {"SentTimestamp": "1765000000000", "ApproximateReceiveCount": "3"},
                }
            ]
        }
    ).encode()
    results = [make(200, answer, {}).receive() for make in (boto3_reader, json_reader)]
    assert results[0] == results[1] == [ReceivedMessage("m0", "r0", '{"user_id": "u"}', 1765000000000, 3)]


def test_a_failed_exchange_is_a_retry_on_the_json_path() -> None:
    """No answer at all (refused, reset, timed out): botocore's HTTPClientError, so SqsUnavailable."""

    def broken(_body: bytes, _headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        raise HTTPClientError(error=ConnectionResetError("reset by peer"))

    reader = SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, transport="json")
    reader._json = transport(broken)
    assert outcome(reader.receive) == "retry"


def test_the_settings_name_the_transports_the_reader_knows() -> None:
    assert config.SQS_CLIENTS == TRANSPORTS


def test_an_unknown_sqs_client_is_a_configuration_error() -> None:
    env = {"MASKING_KEY": "", "SQS_CLIENT": "curl"}
    with pytest.raises(config.ConfigError, match="SQS_CLIENT must be one of json, boto3"):
        config.Settings.from_env(env | {"MASKING_KEY": _key()})


def _key() -> str:
    from pii.masking import generate_key

    return generate_key()


# -- the answer reader: what http.client reads, with one buffer -------------------------------------


class FakeSocket:
    """A socket that returns `data` at most `step` bytes a read (a network splits an answer anywhere)."""

    def __init__(self, data: bytes, step: int = 1 << 20) -> None:
        self.data = io.BytesIO(data)
        self.step = step

    def makefile(self, _mode: str) -> io.BytesIO:
        return self.data

    def recv(self, size: int) -> bytes:
        return self.data.read(min(size, self.step))

    def recv_into(self, view: memoryview) -> int:
        return self.data.readinto(view[: self.step])


def read_by_http_client(raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    response = http.client.HTTPResponse(FakeSocket(raw), method="POST")  # type: ignore[arg-type]
    response.begin()
    headers: dict[str, str] = {}
    for name, value in response.getheaders():  # a repeated field's values joined, in order
        value = " ".join(value.split())
        headers[name.lower()] = f"{headers[name.lower()]}, {value}" if name.lower() in headers else value
    return response.status, headers, response.read(), response.will_close


def read_by_answer(raw: bytes, step: int) -> tuple[int, dict[str, str], bytes, bool]:
    answer = Answer(FakeSocket(raw, step))  # type: ignore[arg-type]
    body = bytes(answer.read())
    headers = {name: " ".join(value.split()) for name, value in answer.headers.items()}
    return answer.status, headers, body, answer.will_close


ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\n{"a\r\n6\r\n": 1}\n\r\n0\r\nX-Trailer: t\r\n\r\n',
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 400 Bad Request\r\nx-amzn-query-error: AWS.SimpleQueueService.NonExistentQueue;Sender\r\n"
    b'Content-Length: 11\r\nConnection: close\r\n\r\n{"a": "b"}\n',
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.0 200 OK\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n two\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\n{}",  # bare line feeds
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil the connection closes",
    b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n{}",  # no reason phrase
    b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70_000,  # past one read
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",  # framed by the first
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 5\r\n\r\n{}",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",  # a 1xx other than 100: returned, bodiless
]


@pytest.mark.parametrize("step", [1, 7, 1 << 20], ids=["byte-by-byte", "7-byte-reads", "one-read"])
@pytest.mark.parametrize("raw", ANSWERS)
def test_the_answer_reader_reads_what_http_client_reads(raw: bytes, step: int) -> None:
    assert read_by_answer(raw, step) == read_by_http_client(raw)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"", http.client.RemoteDisconnected),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", http.client.IncompleteRead),
        (b"SMTP ready\r\n\r\n", http.client.BadStatusLine),
        (b"HTTP/1.1 abc OK\r\n\r\n", http.client.BadStatusLine),
        (b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n", http.client.UnknownProtocol),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", http.client.IncompleteRead),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabcde\r\n0\r\n\r\n", http.client.IncompleteRead),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\n", http.client.IncompleteRead),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775807\r\n\r\n{}", http.client.IncompleteRead),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", http.client.HTTPException),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", http.client.LineTooLong),
    ],
    ids=[
        "closed",
        "cut-body",
        "not-http",
        "bad-status",
        "http2",
        "bad-chunk",
        "negative-chunk",
        "negative-chunk-alone",
        "huge-length",
        "101-headers",
        "long-line",
    ],
)
def test_a_malformed_or_cut_answer_raises_as_http_client_raises(raw: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        read_by_http_client(raw)
    for step in (1, 1 << 20):
        with pytest.raises(error):
            read_by_answer(raw, step)


def test_a_success_answer_that_is_not_json_is_a_failed_exchange() -> None:
    """A 200 whose body is not JSON (a proxy's page, a body cut short) is retried like a lost answer,
    not raised as a parse error the loop would end on."""
    made = transport(lambda _body, _headers: (200, {}, b"<html>gateway</html>"))
    with pytest.raises(HTTPClientError):
        made.call("ReceiveMessage", {"QueueUrl": ENDPOINT + "/000000000000/q"})


def test_a_long_body_is_held_as_it_arrives_not_as_its_length_says() -> None:
    """A Content-Length is the server's word: 300 MB announced and 2 bytes sent cost no 300 MB."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 300000000\r\n\r\n{}"
    tracemalloc.start()
    try:
        with pytest.raises(http.client.IncompleteRead):
            read_by_answer(raw, 1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 << 20


def test_bytes_past_the_answer_close_the_connection() -> None:
    """No request is pipelined: bytes after an answer mean the connection cannot be trusted again."""
    answer = Answer(FakeSocket(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1"))  # type: ignore[arg-type]
    assert (bytes(answer.read()), answer.will_close) == (b"{}", True)


def test_a_repeated_response_field_keeps_every_value() -> None:
    fields = parse_fields([b"Set-Thing: a\r\n", b"set-thing: b\r\n", b"\r\n"])
    assert fields.get("Set-Thing") == "a, b"


def test_a_proxy_makes_boto3_the_default_and_json_a_configuration_error() -> None:
    """The narrow path would go around an HTTPS proxy: unset, SQS_CLIENT is boto3 then; asked for
    explicitly, json is refused with a message that says what to do. AWS_CA_BUNDLE is passed on."""
    env = {"MASKING_KEY": _key()}
    assert config.Settings.from_env(env).sqs_client == "json"
    assert config.Settings.from_env(env | {"HTTPS_PROXY": "http://proxy:3128"}).sqs_client == "boto3"
    bundle = config.Settings.from_env(env | {"AWS_CA_BUNDLE": "/etc/ca.pem"})
    assert (bundle.sqs_client, bundle.ca_bundle) == ("json", "/etc/ca.pem")
    with pytest.raises(config.ConfigError, match="does not honour HTTPS_PROXY: set SQS_CLIENT=boto3"):
        config.Settings.from_env(env | {"HTTPS_PROXY": "http://proxy:3128", "SQS_CLIENT": "json"})


def test_the_signing_key_kept_for_the_day_signs_as_botocore_on_every_call_and_on_the_next_day(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The transport derives the signing key once a day: the second call of a day (the key kept)
    and the first of the next day (a new key) are signed exactly as botocore signs them."""
    params = {"QueueUrl": QUEUE_URL, "MaxNumberOfMessages": 10}
    for now in (FROZEN, FROZEN, FROZEN + datetime.timedelta(days=1)):
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda now=now: now)
        body, headers = sent_by_transport("ReceiveMessage", params)
        theirs = botocore_request("ReceiveMessage", params, body=body)
        assert headers["Authorization"] == _text(theirs.headers["Authorization"]), now


class Captured:
    """A socket that keeps what is written to it."""

    def __init__(self) -> None:
        self.written = b""

    def sendall(self, data: bytes) -> None:
        self.written += data


def test_the_request_written_is_the_one_http_client_writes() -> None:
    """GIVEN the headers and body of a request WHEN the transport writes it in one piece THEN the
    bytes are those http.client writes in pieces for the same request."""
    headers = {"Content-Type": "application/x-amz-json-1.0", "X-Amz-Target": "AmazonSQS.ReceiveMessage", "Host": "h:1"}
    body = b'{"QueueUrl": "q"}'
    theirs = http.client.HTTPConnection("h", 1)
    captured = Captured()
    theirs.sock = captured
    theirs.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        theirs.putheader(name, value)
    theirs.putheader("Content-Length", str(len(body)))
    theirs.endheaders(body)
    assert _request_head("/", headers, len(body)) + body == captured.written


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
def test_a_header_value_with_a_line_break_is_refused_as_http_client_refuses_it(value: str) -> None:
    with pytest.raises(ValueError):
        _request_head("/", {"User-Agent": value}, 0)
    theirs = http.client.HTTPConnection("h")
    theirs.putrequest("POST", "/", skip_host=True, skip_accept_encoding=True)
    with pytest.raises(ValueError):
        theirs.putheader("User-Agent", value)


@pytest.mark.parametrize(
    "endpoint", [ENDPOINT + "/", "https://sqs.eu-west-1.amazonaws.com/", "http://proxy:8080/a b/sqs/"]
)
@pytest.mark.parametrize(("operation", "params"), REQUESTS, ids=[op for op, _ in REQUESTS])
def test_the_canonical_request_is_botocores_text(endpoint: str, operation: str, params: dict[str, Any]) -> None:
    """The signer's canonical request, built in one go, is botocore's SigV4Auth.canonical_request
    for the same request: every hot call, a session token, an endpoint under a path to quote."""
    credentials = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token-of-a-role")
    made = JsonTransport(
        endpoint, "us-east-1", credentials, connect_timeout_seconds=1, read_timeout_seconds=1, max_connections=1
    )
    request = _Request(made.endpoint_url, orjson.dumps(params), made._headers(operation))
    ours = _Signer(credentials, "sqs", "us-east-1")
    ours.add_auth(request)  # sets X-Amz-Date and the token header, as botocore's add_auth does
    del request.headers["Authorization"]  # as add_auth has it when it builds the canonical request
    request.signed = None
    theirs = SigV4Auth(credentials, "sqs", "us-east-1")
    assert ours.canonical_request(request) == theirs.canonical_request(request)
    assert ours.canonical_request(request) == theirs.canonical_request(request)  # the URL's parts kept


# -- a receive within the room of the bytes in hand -------------------------------------------------

ANSWER = json.dumps(
    {"Messages": [{"MessageId": "m0", "ReceiptHandle": "r0", "MD5OfBody": "x", "Body": "{}", "Attributes": {}}]}
).encode()


def sized_json_reader(answer: bytes) -> tuple[SqsReader, list[str]]:
    """A JSON reader whose exchange answers `answer` with its Content-Length, asking `before_read`
    first as the real exchange does; the list records 'read' when the body is read."""
    reads: list[str] = []
    reader = SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, transport="json")

    def exchange(body: bytes, headers: dict[str, str], before_read: Any = None) -> tuple[int, dict[str, str], bytes]:
        if before_read is not None and not before_read(len(answer)):
            return 200, {}, b""
        reads.append("read")
        return 200, {"content-length": str(len(answer))}, answer

    reader._json = transport(lambda _b, _h: (200, {}, b"{}"))
    reader._json._exchange = exchange  # type: ignore[method-assign]
    return reader, reads


def test_a_sized_receive_takes_twice_the_answer_before_reading_it_on_the_json_path() -> None:
    reader, reads = sized_json_reader(ANSWER)
    room = Room(grant=True)
    assert reader.receive_within(room) == [ReceivedMessage("m0", "r0", "{}")]
    assert room.asked == [2 * len(ANSWER)] and reads == ["read"]


def test_a_refused_room_leaves_the_answer_unread_and_returns_nothing_on_the_json_path() -> None:
    reader, reads = sized_json_reader(ANSWER)
    room = Room(grant=False)
    assert reader.receive_within(room) == [] and room.asked == [2 * len(ANSWER)] and reads == []


@pytest.mark.parametrize("grant", [True, False])
def test_a_sized_receive_on_boto3s_path_takes_the_worst_case_before_the_call(grant: bool) -> None:
    reader = boto3_reader(200, ANSWER, {})
    sent: list[str] = []
    reader.client.meta.events.register("before-call.sqs.ReceiveMessage", lambda **_kw: sent.append("call"))
    room = Room(grant)
    assert reader.receive_within(room) == ([ReceivedMessage("m0", "r0", "{}")] if grant else [])
    assert room.asked == [None] and sent == (["call"] if grant else [])


def test_the_queue_check_returns_its_attributes_and_maps_its_errors() -> None:
    attributes = {"Attributes": {"VisibilityTimeout": "30", "MaximumMessageSize": "1048576"}}
    reader = boto3_reader(200, json.dumps(attributes).encode(), {})
    assert reader.check() == {"VisibilityTimeout": "30", "MaximumMessageSize": "1048576"}
    assert boto3_reader(200, b"{}", {}).check() == {}
    gone = b'{"__type":"com.amazonaws.sqs#QueueDoesNotExist","message":"The specified queue does not exist."}'
    gone_headers = {QUERY: "AWS.SimpleQueueService.NonExistentQueue;Sender"}
    with pytest.raises(QueueUnusable, match="GetQueueAttributes on .* failed: AWS.SimpleQueueService.NonExistentQueue"):
        boto3_reader(400, gone, gone_headers).check()
    assert outcome(boto3_reader(503, b"", {}).check) == "retry"


# -- what the reader sends and how it reads the answers (found by mutation testing) ----------------


def capturing_reader(answer: bytes) -> tuple[SqsReader, list[dict[str, Any]]]:
    """A JSON reader that records each request's parameters and answers `answer`."""
    sent: list[dict[str, Any]] = []

    def exchange(body: bytes, _headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        sent.append(json.loads(body))
        return 200, {}, answer

    reader = SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, transport="json")
    reader._json = transport(exchange)
    return reader, sent


def _messages(count: int) -> list[ReceivedMessage]:
    return [ReceivedMessage(f"m{n}", f"receipt-{n}", "{}") for n in range(count)]


@pytest.mark.parametrize("call", ["delete", "change_visibility"])
def test_each_entry_of_a_batch_call_has_its_own_id_and_its_messages_receipt(call: str) -> None:
    """SQS refuses a batch whose entry ids repeat (BatchEntryIdsNotDistinct), and reports a refused
    entry by its id: ids are distinct within a call, and each names its message's receipt."""
    reader, sent = capturing_reader(b"{}")
    messages = _messages(12)
    if call == "delete":
        assert reader.delete(messages) == []
    else:
        assert reader.change_visibility(messages, 45) == []
    assert [len(request["Entries"]) for request in sent] == [10, 2]
    for request, chunk in zip(sent, (messages[:10], messages[10:]), strict=True):
        assert len({entry["Id"] for entry in request["Entries"]}) == len(chunk)
        assert [entry["ReceiptHandle"] for entry in request["Entries"]] == [m.receipt_handle for m in chunk]
        if call == "change_visibility":
            assert {entry["VisibilityTimeout"] for entry in request["Entries"]} == {45}


def test_an_answer_without_failed_entries_means_every_entry_was_done() -> None:
    reader, _ = capturing_reader(b'{"Successful": [{"Id": "0"}]}')
    assert reader.delete(_messages(1)) == [] and reader.change_visibility(_messages(1), 30) == []


def test_a_refused_delete_is_logged_with_its_message_id_and_code(caplog: pytest.LogCaptureFixture) -> None:
    answer = b'{"Failed": [{"Id": "1", "Code": "ReceiptHandleIsInvalid", "SenderFault": true}, {"Id": "0"}]}'
    reader, _ = capturing_reader(answer)
    with caplog.at_level(logging.WARNING, logger="aws.sqs"):
        assert reader.delete(_messages(2)) == ["m1", "m0"]
    assert [r.getMessage() for r in caplog.records] == [
        "delete refused for message m1: ReceiptHandleIsInvalid",
        "delete refused for message m0: unknown",
    ]


@pytest.mark.parametrize("call", ["delete", "change_visibility"])
def test_a_failed_batch_call_names_its_operation(call: str) -> None:
    reader = json_reader(503, b"", {})
    with pytest.raises(
        SqsUnavailable,
        match="^DeleteMessageBatch failed" if call == "delete" else "^ChangeMessageVisibilityBatch failed",
    ):
        if call == "delete":
            reader.delete(_messages(1))
        else:
            reader.change_visibility(_messages(1), 30)


@pytest.mark.parametrize(("seconds", "allowed"), [(-1, False), (0, True), (43_200, True), (43_201, False)])
def test_a_visibility_timeout_is_within_sqs_limits(seconds: int, allowed: bool) -> None:
    """0 (visible now) to 12 hours, as SQS takes it; anything else is refused before a call."""
    reader, sent = capturing_reader(b"{}")
    if allowed:
        assert reader.change_visibility(_messages(1), seconds) == [] and len(sent) == 1
    else:
        with pytest.raises(ValueError, match="timeout_seconds must be within 0..43200"):
            reader.change_visibility(_messages(1), seconds)
        assert sent == []


def test_a_received_message_without_attributes_or_body_reads_with_the_defaults() -> None:
    """No Attributes (an emulator that ignores MessageSystemAttributeNames), no Body: a first
    delivery of unknown send time and an empty body; an empty SentTimestamp is unknown too."""
    answer = json.dumps(
        {
            "Messages": [
                {"MessageId": "m0", "ReceiptHandle": "r0"},
                {"MessageId": "m1", "ReceiptHandle": "r1", "Body": "b", "Attributes": {"SentTimestamp": ""}},
            ]
        }
    ).encode()
    reader, _ = capturing_reader(answer)
    before = time.monotonic()
    got = reader.receive()
    assert got == [ReceivedMessage("m0", "r0", "", None, 1), ReceivedMessage("m1", "r1", "b", None, 1)]
    assert all(before <= m.received_at <= time.monotonic() for m in got)  # stamped before the call


def test_a_receive_long_polls_for_the_readers_wait_unless_told_otherwise() -> None:
    reader, sent = capturing_reader(b"{}")
    reader.wait_time_seconds = 7
    assert reader.receive() == [] and reader.receive(wait_time_seconds=0) == []
    assert reader.receive_within(Room(grant=True)) == []
    assert [request["WaitTimeSeconds"] for request in sent] == [7, 0, 7]
    assert all(request["MaxNumberOfMessages"] == 10 and request["QueueUrl"] == QUEUE_URL for request in sent)
    assert all(
        request["MessageSystemAttributeNames"] == ["SentTimestamp", "ApproximateReceiveCount"] for request in sent
    )


@pytest.mark.parametrize("transport_name", TRANSPORTS)
def test_a_failed_receive_names_its_operation(transport_name: str) -> None:
    reader = json_reader(503, b"", {}) if transport_name == "json" else boto3_reader(503, b"", {})
    for receive in (reader.receive, lambda: reader.receive_within(Room(grant=True))):
        with pytest.raises(SqsUnavailable, match="^ReceiveMessage failed"):
            receive()


# -- the reader's configuration (found by mutation testing) ----------------------------------------


def test_a_reader_by_default_long_polls_20_s_on_the_json_path_with_one_attempt_per_call() -> None:
    """The defaults the run relies on: 20 s long polls read with 10 s to spare (a long poll must
    not look like a hang), 5 s to connect, one botocore attempt (our Retrier alone retries), a pool
    for every thread, no per-call parameter validation, the JSON transport, us-east-1."""
    reader = SqsReader(QUEUE_URL, endpoint_url=ENDPOINT)
    assert (reader.transport, reader.queue_url, reader.wait_time_seconds) == ("json", QUEUE_URL, 20)
    client_config = reader.client.meta.config
    assert (client_config.connect_timeout, client_config.read_timeout) == (5.0, 30)
    assert client_config.retries == {"mode": "standard", "total_max_attempts": 1}
    assert client_config.max_pool_connections == 32
    # botocore's meta.config reads True whatever was asked; the serializer says whether it validates
    assert not isinstance(reader.client._serializer, botocore.validate.ParamValidationDecorator)
    assert reader.client.meta.region_name == "us-east-1" and reader.client.meta.endpoint_url == ENDPOINT


def test_the_json_transport_is_made_once_with_the_readers_endpoint_region_and_timeouts() -> None:
    reader = SqsReader(
        QUEUE_URL,
        endpoint_url=ENDPOINT,
        region="eu-west-1",
        wait_time_seconds=7,
        connect_timeout_seconds=2.5,
        max_connections=3,
        ca_bundle=certifi_bundle(),
    )
    made = reader._json_transport()
    assert reader._json_transport() is made and reader._json is made
    assert (made.endpoint_url, made.region) == (ENDPOINT + "/", "eu-west-1")
    assert (made._connect_timeout, made._read_timeout, made._max_idle) == (2.5, 17, 3)
    assert reader._json_transport().call.__self__ is made  # type: ignore[attr-defined]


def certifi_bundle() -> str:
    from botocore.httpsession import get_cert_path

    return str(get_cert_path(True))


@pytest.mark.parametrize(("seconds", "allowed"), [(-1, False), (0, True), (20, True), (21, False)])
def test_a_long_poll_is_within_sqs_limits(seconds: int, allowed: bool) -> None:
    if allowed:
        assert SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, wait_time_seconds=seconds).wait_time_seconds == seconds
    else:
        with pytest.raises(ValueError, match="wait_time_seconds must be within 0..20"):
            SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, wait_time_seconds=seconds)


def test_an_unknown_transport_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="transport must be one of json, boto3, got 'curl'"):
        SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, transport="curl")


def test_the_queue_check_asks_for_every_attribute_of_its_queue() -> None:
    reader = boto3_reader(200, b'{"Attributes": {}}', {})
    sent: list[dict[str, Any]] = []
    reader.client.meta.events.register(
        "before-send.sqs.GetQueueAttributes",
        lambda request, **_kw: sent.append(json.loads(request.body)),
        unique_id="x",
    )
    reader.check()
    assert sent == [{"QueueUrl": QUEUE_URL, "AttributeNames": ["All"]}]


def test_a_sized_receive_names_its_operation_and_takes_the_worst_case_for_an_answer_of_unknown_size() -> None:
    targets: list[str] = []
    reader = SqsReader(QUEUE_URL, endpoint_url=ENDPOINT, transport="json")

    def exchange(body: bytes, headers: dict[str, str], before_read: Any = None) -> tuple[int, dict[str, str], bytes]:
        targets.append(headers["X-Amz-Target"])
        return (200, {}, ANSWER) if before_read(None) else (200, {}, b"")  # chunked: no Content-Length

    reader._json = transport(lambda _b, _h: (200, {}, b"{}"))
    reader._json._exchange = exchange  # type: ignore[method-assign]
    room = Room(grant=True)
    assert len(reader.receive_within(room)) == 1
    assert room.asked == [None] and targets == ["AmazonSQS.ReceiveMessage"]


def test_an_https_transport_verifies_with_the_readers_ca_bundle(tmp_path: Any) -> None:
    """AWS_CA_BUNDLE's file (a proxy's or a private CA's) is what the JSON transport trusts, not
    botocore's default bundle: here a bundle of one certificate out of the default's many."""
    default = pathlib.Path(certifi_bundle()).read_text()
    first = default[default.index("-----BEGIN CERTIFICATE-----") :]
    one = first[: first.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n"
    bundle = tmp_path / "ca.pem"
    bundle.write_text(one)
    reader = SqsReader(QUEUE_URL, endpoint_url="https://sqs.example", ca_bundle=str(bundle))
    made = reader._json_transport()
    assert made._ssl is not None and len(made._ssl.get_ca_certs()) == 1
    plain = SqsReader(QUEUE_URL, endpoint_url="https://sqs.example")._json_transport()
    assert plain._ssl is not None and len(plain._ssl.get_ca_certs()) > 1
