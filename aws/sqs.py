"""SqsReader: receive login messages in batches and delete them after their commit.

Keeping messages in hand hidden (visibility) is aws/visibility.py's job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from aws.errors import AwsError
from aws.limits import BATCH_LIMIT, MAX_VISIBILITY_TIMEOUT_SECONDS, MAX_WAIT_TIME_SECONDS, chunks
from aws.sqs_json import JsonTransport
from models import ReceivedMessage, ReceiveRoom

if TYPE_CHECKING:  # types-boto3-sqs (requirements-dev.txt): typed calls, no runtime cost
    from types_boto3_sqs.client import SQSClient

logger = logging.getLogger(__name__)


# How the hot calls (receive, delete, change visibility) reach SQS: "json", aws/sqs_json.py's narrow
# path (botocore's credentials and signer, a fifth of boto3's CPU per call: docs/benchmarks.md), or
# "boto3", the boto3 client for every call. Every other call always goes through the boto3 client.
TRANSPORTS = ("json", "boto3")

# Errors that say the queue itself is wrong, not that the network hiccuped.
_FATAL_CODES = {
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
}


class SqsError(AwsError):
    """An SQS call failed."""


class SqsUnavailable(SqsError):
    """Raised when SQS cannot be reached or answers with a transient error; retry later."""


class QueueUnusable(SqsError):
    """Raised when the queue cannot be used at all: it does not exist, access is denied, or the
    credentials are invalid. Retrying does not help."""


class SqsReader:
    """Receives from one queue and deletes (or hides longer) by receipt handle."""

    def __init__(
        self,
        queue_url: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        wait_time_seconds: int = MAX_WAIT_TIME_SECONDS,
        max_attempts: int = 1,
        connect_timeout_seconds: float = 5.0,
        max_connections: int = 32,
        transport: str = "json",
        parameter_validation: bool = False,
        ca_bundle: str | None = None,
    ) -> None:
        if not 0 <= wait_time_seconds <= MAX_WAIT_TIME_SECONDS:
            raise ValueError(f"wait_time_seconds must be within 0..{MAX_WAIT_TIME_SECONDS}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.transport = transport
        self._ca_bundle = ca_bundle
        self._connect_timeout = connect_timeout_seconds
        self._max_connections = max_connections
        self.queue_url = queue_url
        self.wait_time_seconds = wait_time_seconds
        # botocore's session, not boto3's: boto3 adds nothing an SQS client uses, and importing it
        # (s3transfer with it) cost a tenth of a second of every start's CPU.
        self._session = botocore.session.get_session()
        self._region = region
        self._endpoint_url = endpoint_url
        self._config = Config(
            connect_timeout=connect_timeout_seconds,
            read_timeout=wait_time_seconds + 10,  # a long poll must not look like a hang
            # Attempts per call, the first included (botocore's `max_attempts` would count retries
            # only). One by default: our Retrier (etl/retry.py) alone decides when to try again, so no
            # botocore retries run underneath its backoff, budget and stop deadline.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            max_pool_connections=max_connections,  # one client serves every thread
            # Our requests are built by this module from typed values: botocore's check of every
            # parameter against the model on every call is CPU spent for nothing.
            parameter_validation=parameter_validation,
        )
        self._lock = threading.Lock()
        self._client: SQSClient | None = None
        self._json: JsonTransport | None = None

    @property
    def client(self) -> SQSClient:
        """The SQS client, created on first use and shared by every thread.

        boto3's low-level clients are thread-safe; one client with a connection pool as large as
        the threads using it costs far less memory than a client per thread (see the peak RSS in
        docs/benchmarks.md).
        """
        client = self._client
        if client is None:
            with self._lock:  # Session.client is not thread-safe
                client = self._client
                if client is None:
                    client = self._client = self._session.create_client(
                        "sqs", region_name=self._region, endpoint_url=self._endpoint_url, config=self._config
                    )
        return client

    def check(self) -> dict[str, str]:
        """Return the queue's attributes; raise QueueUnusable or SqsUnavailable."""
        with self._errors("GetQueueAttributes"):
            response = self.client.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=["All"])
        return {str(name): value for name, value in response.get("Attributes", {}).items()}

    def receive(self, *, wait_time_seconds: int | None = None) -> list[ReceivedMessage]:
        """Receive up to 10 messages, long-polling; an empty list means none arrived in time."""
        return self._receive(wait_time_seconds, None)

    def receive_within(self, room: ReceiveRoom) -> list[ReceivedMessage]:
        """`receive`, taking room for the response before reading it (models.SizedMessageSource):
        twice its Content-Length with the JSON transport (ANSWER_COPIES), else `room.worst_case`
        before the call. If the
        room is refused (the loop is stopping), the response is dropped unread and [] returned:
        SQS made its messages invisible, and they reappear after their visibility timeout."""
        return self._receive(None, room)

    def _receive(self, wait_time_seconds: int | None, room: ReceiveRoom | None) -> list[ReceivedMessage]:
        started = time.monotonic()  # before the call: SQS hands the messages over within it
        params = {
            "QueueUrl": self.queue_url,
            "MaxNumberOfMessages": BATCH_LIMIT,
            "WaitTimeSeconds": self.wait_time_seconds if wait_time_seconds is None else wait_time_seconds,
            "MessageSystemAttributeNames": ["SentTimestamp", "ApproximateReceiveCount"],
        }
        with self._errors("ReceiveMessage"):
            if room is None:
                response = self._call("ReceiveMessage", params)
            elif self.transport == "json":
                response = self._json_transport().call("ReceiveMessage", params, before_read=_answer_room(room))
            elif room.take(None):
                response = self._call("ReceiveMessage", params)
            else:
                response = {}
        return [_to_message(raw, started) for raw in response.get("Messages", [])]

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        """Delete messages in batches of 10; return the ids of entries SQS refused.

        Call only after the transaction that stored the messages has committed. A refused entry
        (e.g. a receipt handle gone stale after a redelivery) is harmless: the message will come
        back and its idempotent insert will do nothing.
        """
        failed: list[str] = []
        for chunk in chunks(messages):
            entries = [{"Id": str(i), "ReceiptHandle": m.receipt_handle} for i, m in enumerate(chunk)]
            with self._errors("DeleteMessageBatch"):
                response = self._call("DeleteMessageBatch", {"QueueUrl": self.queue_url, "Entries": entries})
            for entry in response.get("Failed", []):
                message = chunk[int(entry["Id"])]
                failed.append(message.message_id)
                logger.warning("delete refused for message %s: %s", message.message_id, entry.get("Code", "unknown"))
        return failed

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        """Hide messages for `timeout_seconds` more (from now); return the receipt handles SQS refused
        (not message ids: two copies of one message may be in one call, and only one be stale)."""
        if not 0 <= timeout_seconds <= MAX_VISIBILITY_TIMEOUT_SECONDS:
            raise ValueError(f"timeout_seconds must be within 0..{MAX_VISIBILITY_TIMEOUT_SECONDS}")
        failed: list[str] = []
        for chunk in chunks(messages):
            entries = [
                {"Id": str(i), "ReceiptHandle": m.receipt_handle, "VisibilityTimeout": timeout_seconds}
                for i, m in enumerate(chunk)
            ]
            with self._errors("ChangeMessageVisibilityBatch"):
                response = self._call("ChangeMessageVisibilityBatch", {"QueueUrl": self.queue_url, "Entries": entries})
            failed.extend(chunk[int(entry["Id"])].receipt_handle for entry in response.get("Failed", []))
        return failed

    def _call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """One hot call, through the transport chosen (both raise botocore's errors)."""
        if self.transport == "json":
            return self._json_transport().call(operation, params)
        method: Callable[..., dict[str, Any]] = getattr(self.client, _METHOD_NAMES[operation])
        return method(**params)

    def _json_transport(self) -> JsonTransport:
        transport = self._json
        if transport is None:
            client = self.client  # botocore resolves the endpoint and finds the credentials, once
            with self._lock:
                transport = self._json
                if transport is None:
                    transport = self._json = JsonTransport(
                        client.meta.endpoint_url,
                        client.meta.region_name,
                        self._session.get_credentials(),
                        connect_timeout_seconds=self._connect_timeout,
                        read_timeout_seconds=self.wait_time_seconds + 10,
                        max_connections=self._max_connections,
                        ca_bundle=self._ca_bundle,
                    )
        return transport

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """Translate botocore's errors for `operation` into QueueUnusable or SqsUnavailable."""
        try:
            yield
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in _FATAL_CODES:
                raise QueueUnusable(
                    f"{operation} on {self.queue_url} failed: {code}. "
                    "Check SQS_QUEUE_URL, the region and the credentials."
                ) from None
            raise SqsUnavailable(f"{operation} failed: {code or exc}") from exc
        except BotoCoreError as exc:
            raise SqsUnavailable(f"{operation} failed: {type(exc).__name__}: {exc}") from exc


# An answer of N bytes is held twice while it is read: its bytes, and the messages decoded from them.
ANSWER_COPIES = 2


def _answer_room(room: ReceiveRoom) -> Callable[[int | None], bool]:
    """What the JSON transport asks before it reads an answer: room for the answer as it is held
    while read (ANSWER_COPIES times its Content-Length), or for the worst case if it has none."""
    return lambda length: room.take(None if length is None else ANSWER_COPIES * length)


_METHOD_NAMES = {
    "ReceiveMessage": "receive_message",
    "DeleteMessageBatch": "delete_message_batch",
    "ChangeMessageVisibilityBatch": "change_message_visibility_batch",
}


def _to_message(raw: dict[str, Any], received_at: float) -> ReceivedMessage:
    attributes = raw.get("Attributes", {})
    sent = attributes.get("SentTimestamp")
    return ReceivedMessage(
        message_id=raw["MessageId"],
        receipt_handle=raw["ReceiptHandle"],
        body=raw.get("Body", ""),
        sent_timestamp_ms=int(sent) if sent else None,
        receive_count=int(attributes.get("ApproximateReceiveCount", 1)),
        received_at=received_at,
    )
