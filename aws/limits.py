"""SQS's documented limits, in one place, and the one way a list is cut into SQS-sized batches.

ReceiveMessage returns at most 10 messages; DeleteMessageBatch and ChangeMessageVisibilityBatch take
at most 10 entries (API reference: API_ReceiveMessage.html, API_DeleteMessageBatch.html). No boto3
import: config.py reads these too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")

BATCH_LIMIT = 10  # messages per receive, entries per batch call
MAX_WAIT_TIME_SECONDS = 20
MAX_VISIBILITY_TIMEOUT_SECONDS = 43_200
MAX_MESSAGE_BYTES = 1_048_576  # the quota since 2025-08 (was 256 KiB); MaximumMessageSize's maximum


def chunks(items: Sequence[T], size: int = BATCH_LIMIT) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size`, in order."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
