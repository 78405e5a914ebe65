"""The SQS event a Lambda event source mapping hands the function, and the partial batch response.

Record fields as in AWS's sample event (docs.aws.amazon.com/lambda/latest/dg/with-sqs.html):
`messageId`, `receiptHandle`, `body`, `attributes` (`ApproximateReceiveCount`, `SentTimestamp`, ...),
`messageAttributes`, `md5OfBody`, `eventSource` ("aws:sqs"), `eventSourceARN`, `awsRegion`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aws.errors import AwsError
from models import ReceivedMessage

EVENT_SOURCE = "aws:sqs"


class EventError(AwsError, ValueError):
    """Raised when an event is not an SQS batch (no `Records`, or a record without its identity)."""


def messages_of(event: Mapping[str, Any]) -> list[ReceivedMessage]:
    """The records of an SQS event as ReceivedMessages, in order; raise EventError naming what is missing.

    A record from another event source, or without `messageId`/`receiptHandle`/`body`, cannot be
    handled (nor reported: the response names records by `messageId`), so the whole event is refused.
    """
    records = event.get("Records") if isinstance(event, Mapping) else None
    if not isinstance(records, list):
        raise EventError("the event has no Records list: is the function's trigger an SQS queue?")
    messages = []
    for position, record in enumerate(records):
        if not isinstance(record, Mapping) or record.get("eventSource", EVENT_SOURCE) != EVENT_SOURCE:
            raise EventError(f"record {position} is not an SQS message (eventSource must be {EVENT_SOURCE!r})")
        missing = [name for name in ("messageId", "receiptHandle", "body") if not isinstance(record.get(name), str)]
        if missing:
            raise EventError(f"record {position} lacks {', '.join(missing)}")
        attributes = record.get("attributes") or {}
        messages.append(
            ReceivedMessage(
                message_id=record["messageId"],
                receipt_handle=record["receiptHandle"],
                body=record["body"],
                sent_timestamp_ms=_int_or_none(attributes.get("SentTimestamp")),
                receive_count=_int_or_none(attributes.get("ApproximateReceiveCount")) or 1,
            )
        )
    return messages


def source_arn(event: Mapping[str, Any]) -> str | None:
    """The queue's ARN (`eventSourceARN`) of the event's first record: one mapping, one queue."""
    records = event.get("Records") if isinstance(event, Mapping) else None
    if isinstance(records, list) and records and isinstance(records[0], Mapping):
        arn = records[0].get("eventSourceARN")
        return arn if isinstance(arn, str) and arn else None
    return None


def batch_response(message_ids: Iterable[str]) -> dict[str, list[dict[str, str]]]:
    """The partial batch response (`ReportBatchItemFailures`): the messages SQS must deliver again.

    Each id once, in order; an empty list tells Lambda to delete the whole batch.
    """
    return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in dict.fromkeys(message_ids)]}


def _int_or_none(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
