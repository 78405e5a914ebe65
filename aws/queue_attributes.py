"""What the loop takes from the queue's own attributes (GetQueueAttributes, `SqsReader.check()`).

https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_GetQueueAttributes.html
"""

from __future__ import annotations

import json
from collections.abc import Mapping

DEFAULT_VISIBILITY_TIMEOUT_SECONDS = 30  # SQS's default VisibilityTimeout


def visibility_timeout_seconds(attributes: Mapping[str, str]) -> int:
    """The queue's VisibilityTimeout (SQS's default when absent)."""
    return int(attributes.get("VisibilityTimeout", DEFAULT_VISIBILITY_TIMEOUT_SECONDS))


def max_message_bytes(attributes: Mapping[str, str], *, quota: int) -> int:
    """The queue's MaximumMessageSize, or `quota` (SQS's largest) when absent or beyond it."""
    raw = attributes.get("MaximumMessageSize", "")
    return int(raw) if raw.isdigit() and 0 < int(raw) <= quota else quota


def max_receives(wanted: int, attributes: Mapping[str, str]) -> int:
    """At most `wanted`, and one receive below the RedrivePolicy's maxReceiveCount: a message whose
    processing keeps failing is quarantined by us before SQS would move it to the dead-letter queue."""
    try:
        dlq_after = int(json.loads(attributes["RedrivePolicy"])["maxReceiveCount"])
    except (KeyError, ValueError, TypeError):
        return wanted
    return max(1, min(wanted, dlq_after - 1))
