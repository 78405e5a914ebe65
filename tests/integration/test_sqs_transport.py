"""SqsReader's two transports (SQS_CLIENT=json, the narrow signed path; boto3) against real emulators over HTTP.

The same scenarios on each transport, on LocalStack (TEST_SQS_ENDPOINT) and, for a second opinion,
on moto's server (TEST_MOTO_ENDPOINT, default the KMS moto of scripts/stack.sh on :4599, which
serves SQS too; a few messages only: moto rescans its queue on every call).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.credentials import Credentials
from botocore.exceptions import HTTPClientError

from aws import sqs_json
from aws.sqs import TRANSPORTS, QueueUnusable, SqsReader
from aws.sqs_json import KERNEL_TIMEOUTS, JsonTransport
from helpers import TEST_KMS_ENDPOINT, TEST_SQS_ENDPOINT, emulator_client, unavailable
from proxy import TcpProxy
from tests.fakes import Room

TEST_MOTO_ENDPOINT = os.environ.get("TEST_MOTO_ENDPOINT", TEST_KMS_ENDPOINT)
EMULATORS = {"localstack": TEST_SQS_ENDPOINT, "moto": TEST_MOTO_ENDPOINT}


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture(params=list(EMULATORS))
def emulator(request: pytest.FixtureRequest) -> str:
    endpoint = EMULATORS[request.param]
    client = emulator_client("sqs", endpoint)
    try:
        client.list_queues()
    except Exception as exc:  # noqa: BLE001 - any failure means: no emulator
        unavailable(f"SQS on {request.param} at {endpoint} ({type(exc).__name__})")
    return endpoint


@pytest.fixture
def queue(emulator: str) -> Iterator[tuple[Any, str]]:
    """(a boto3 client of the emulator, a fresh uuid-named queue's URL); the queue is deleted after."""
    client = emulator_client("sqs", emulator)
    url = client.create_queue(QueueName=f"test-{uuid.uuid4().hex}", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    yield client, url
    client.delete_queue(QueueUrl=url)


def reader(endpoint: str, url: str, transport: str) -> SqsReader:
    return SqsReader(url, endpoint_url=endpoint, wait_time_seconds=1, transport=transport)


def send(client: Any, url: str, count: int) -> set[str]:
    bodies = {f'{{"n": {n}, "text": "é ✓ \\u0000"}}' for n in range(count)}
    for start in range(0, count, 10):
        chunk = sorted(bodies)[start : start + 10]
        client.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(chunk)])
    return bodies


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_messages_are_received_whole_and_deleted(queue: tuple[Any, str], emulator: str, transport: str) -> None:
    """GIVEN 23 messages WHEN received in tens and deleted in batches THEN every body arrives intact,
    with its SentTimestamp and receive count, and the queue ends empty."""
    client, url = queue
    sent = send(client, url, 23)
    sqs = reader(emulator, url, transport)
    received = []
    while batch := sqs.receive():
        assert len(batch) <= 10
        assert sqs.delete(batch) == []
        received += batch
    assert {m.body for m in received} == sent
    assert all(m.sent_timestamp_ms and m.receive_count == 1 for m in received)
    attributes = client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == attributes["ApproximateNumberOfMessagesNotVisible"] == "0"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_visibility_change_to_zero_brings_the_message_back(
    queue: tuple[Any, str], emulator: str, transport: str
) -> None:
    client, url = queue
    send(client, url, 1)
    sqs = reader(emulator, url, transport)
    (first,) = sqs.receive()
    assert sqs.change_visibility([first], 0) == []
    (again,) = sqs.receive()
    assert (again.message_id, again.receive_count) == (first.message_id, 2)
    assert sqs.delete([again]) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_stale_receipt_handle_is_a_refused_entry_not_an_error(
    queue: tuple[Any, str], emulator: str, transport: str
) -> None:
    """A delete of a receipt handle SQS does not know: refused entry by entry, the others deleted."""
    client, url = queue
    send(client, url, 2)
    sqs = reader(emulator, url, transport)
    batch = sqs.receive()
    while len(batch) < 2:
        batch += sqs.receive()
    forged = type(batch[0])(batch[0].message_id, "not-a-receipt-handle", batch[0].body)
    assert sqs.delete([forged, batch[1]]) == [batch[0].message_id]
    assert sqs.delete([batch[0]]) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_missing_queue_is_unusable_on_both_transports(emulator: str, transport: str) -> None:
    url = f"{emulator}/000000000000/missing-{uuid.uuid4().hex}"
    with pytest.raises(QueueUnusable):
        reader(emulator, url, transport).receive()


def test_a_kept_connection_closed_by_the_other_side_is_replaced(queue: tuple[Any, str], emulator: str) -> None:
    """The narrow path keeps connections alive; one the server (here a proxy) closed while idle is
    not reused: the next call opens a new one and succeeds."""
    client, url = queue
    send(client, url, 2)
    target = emulator.split("//", 1)[1]
    host, port = target.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    try:
        sqs = reader(f"http://{proxy.host}:{proxy.port}", url, "json")
        first = sqs.receive()
        proxy.cut()
        proxy.restore()
        assert sqs.delete(first) == []
        rest = sqs.receive()
        assert sqs.delete(rest) == []
        assert len(first) + len(rest) == 2
    finally:
        proxy.close()


def test_a_connection_back_a_moment_ago_is_used_unchecked_and_an_idle_one_checked_first(
    queue: tuple[Any, str], emulator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check that the server has not closed a kept connection (a system call) is made for one
    idle a second or more, not for one that came back a moment ago; either way the call succeeds."""
    _, url = queue
    checks: list[object] = []
    plain = sqs_json._dropped

    def counted(conn: object) -> bool:
        checks.append(conn)
        return plain(conn)  # type: ignore[arg-type]

    monkeypatch.setattr(sqs_json, "_dropped", counted)
    sqs = reader(emulator, url, "json")
    sqs.receive(wait_time_seconds=0)
    made = sqs._json
    assert made is not None
    if not made._idle:
        pytest.skip(f"{emulator} closes each connection after its answer: none is kept to check")
    sqs.receive(wait_time_seconds=0)
    assert checks == []
    assert len(made._idle) == 1
    conn, returned_at = made._idle[0]
    made._idle[0] = (conn, returned_at - sqs_json.UNCHECKED_SECONDS)
    sqs.receive(wait_time_seconds=0)
    assert checks == [conn]


def test_a_connection_closed_by_the_server_a_moment_after_its_answer_is_replaced_within_the_call(
    queue: tuple[Any, str], emulator: str
) -> None:
    """A connection used unchecked that the server had closed: the call goes once more on a new
    connection and succeeds, nothing lost or doubled."""
    client, url = queue
    send(client, url, 3)
    host, port = emulator.split("//", 1)[1].rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    try:
        sqs = reader(f"http://{proxy.host}:{proxy.port}", url, "json")
        first = sqs.receive()
        made = sqs._json
        assert made is not None
        if not made._idle:
            pytest.skip(f"{emulator} closes each connection after its answer: none is kept")
        proxy.cut()
        proxy.restore()
        assert len(made._idle) == 1  # back a moment ago: used unchecked
        assert sqs.delete(first) == []
        rest: list[Any] = []
        while len(first) + len(rest) < 3 and (more := sqs.receive()):
            assert sqs.delete(more) == []
            rest += more
        assert sorted(m.message_id for m in first + rest) == sorted({m.message_id for m in first + rest})
        assert len(first) + len(rest) == 3
    finally:
        proxy.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_sized_receive_takes_room_for_the_answer_before_reading_it(
    queue: tuple[Any, str], emulator: str, transport: str
) -> None:
    """GIVEN 10 messages of 20,000 bytes WHEN received within a room THEN the room is asked once,
    before the answer is read: for the answer's size (its Content-Length, at least the bodies'
    bytes) on the JSON path, for the worst case on boto3's, which cannot see it first."""
    client, url = queue
    bodies = {f"{n:02d}" + "é" * 9_999 for n in range(10)}  # 20,000 UTF-8 bytes each
    client.send_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": b} for i, b in enumerate(bodies)])
    sqs = reader(emulator, url, transport)
    room = Room(grant=True)
    received: list[Any] = []
    while len(received) < 10 and (batch := sqs.receive_within(room)):
        received += batch
    assert {m.body for m in received} == bodies
    if transport == "json":
        assert all(isinstance(size, int) and size >= 20_000 for size in room.asked)
        assert sum(room.asked) >= 200_000  # type: ignore[arg-type]
    else:
        assert set(room.asked) == {None}


def test_a_refused_room_drops_the_answer_unread_and_its_messages_come_back(
    queue: tuple[Any, str], emulator: str
) -> None:
    """GIVEN a message WHEN a sized receive's room is refused (the loop is stopping) THEN nothing is
    returned, the connection is not reused half-read, and the message comes back after its
    visibility timeout, whole, to a later receive on the same reader."""
    client, url = queue
    client.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "1"})
    client.send_message(QueueUrl=url, MessageBody="kept " + "x" * 5000)
    sqs = reader(emulator, url, "json")
    refused = Room(grant=False)
    assert sqs.receive_within(refused) == []
    assert len(refused.asked) == 1 and (refused.asked[0] or 0) >= 5000
    again: list[Any] = []
    for _ in range(10):
        again = sqs.receive_within(Room(grant=True))
        if again:
            break
    assert [m.body for m in again] == ["kept " + "x" * 5000]
    assert again[0].receive_count == 2


# -- the read timeout on a plain connection, and on a TLS one ---------------------------------------


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """An HTTP endpoint on loopback that accepts connections and never answers; its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for conn in accepted:
            conn.close()


def plain_transport(endpoint: str, read_timeout: float) -> JsonTransport:
    return JsonTransport(
        endpoint,
        "us-east-1",
        Credentials("AKIDEXAMPLE", "secret"),
        connect_timeout_seconds=1,
        read_timeout_seconds=read_timeout,
        max_connections=1,
    )


@pytest.mark.skipif(not KERNEL_TIMEOUTS, reason="kernel timeouts are set on Linux only")
def test_a_plain_connection_is_bounded_by_the_kernels_timeouts_not_pythons() -> None:
    """A plain connection is a blocking socket whose reads and writes the kernel bounds by the read
    timeout (a Python timeout would poll before every recv and send)."""
    with silent_server() as endpoint:
        conn, _ = plain_transport(endpoint, 2.25)._checkout()
        sock = conn.sock
        assert sock is not None and sock.gettimeout() is None
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            seconds, micros = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, option, 16))
            assert abs(seconds + micros / 1e6 - 2.25) < 0.02  # the kernel rounds it to its clock's ticks
        conn.close()


def test_a_server_that_never_answers_is_a_timed_out_exchange_on_the_json_path() -> None:
    """GIVEN a server that takes the request and never answers WHEN the transport calls it THEN the
    read timeout ends the exchange as a failed one that says so (a retry for the reader)."""
    failures: list[BaseException] = []

    def call(made: JsonTransport) -> None:
        try:
            made.call("ReceiveMessage", {"QueueUrl": "http://127.0.0.1/000000000000/q"})
        except BaseException as exc:  # noqa: BLE001 - kept for the assertions
            failures.append(exc)

    with silent_server() as endpoint:
        caller = threading.Thread(target=call, args=(plain_transport(endpoint, 0.2),), daemon=True)
        caller.start()
        caller.join(30)
        assert not caller.is_alive(), "the read timeout did not end the exchange"
    assert len(failures) == 1 and isinstance(failures[0], HTTPClientError)
    assert "no answer within 0.2 s" in str(failures[0]) or "timed out" in str(failures[0])


def test_a_tls_connection_keeps_pythons_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ssl module retries a blocking socket's timed-out read for ever: a TLS connection is
    bounded by Python's timeout (here the TLS handshake is left out, the branch is what is tested)."""
    monkeypatch.setattr(http.client.HTTPSConnection, "connect", http.client.HTTPConnection.connect)
    with silent_server() as endpoint:
        made = plain_transport(endpoint.replace("http://", "https://"), 2.25)
        conn, _ = made._checkout()
        assert conn.sock is not None and conn.sock.gettimeout() == 2.25
        conn.close()
