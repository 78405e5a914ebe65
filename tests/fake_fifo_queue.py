"""A FIFO SQS queue in memory, on FakeQueue's virtual clock. Each behaviour is the one the SQS
Developer Guide gives ("FIFO queue delivery logic", "Using the message deduplication ID"); the
contract suite (tests/contract_sqs.py, FIFO_SCENARIOS) runs the same scenarios on the emulators:

- the messages of one MessageGroupId are delivered in the order sent; while any message of a group
  is in flight (received, neither deleted nor past its visibility deadline) no other message of that
  group is delivered; other groups go on. One receive returns as many messages of one group as it
  can (in order) before it takes another group's, at most 10 in all;
- a send whose MessageDeduplicationId (or, on a queue with ContentBasedDeduplication, the SHA-256 of
  its body) was sent within the last 5 minutes is accepted and not enqueued: it answers the first
  send's MessageId. The id is remembered from its send, also after that message was deleted;
- visibility, receipt handles, ApproximateReceiveCount and the redrive policy as FakeQueue's: a
  group's head moved to the dead-letter queue releases the group;
- a receive that finds nothing to deliver while messages wait behind a group in flight waits (in
  real time, up to `long_poll_seconds`) for a delete or a visibility change to release one, as
  SQS's long poll (WaitTimeSeconds) does; 0: it answers at once, as a receive without a long poll;
- no injected duplicates: FIFO queues "don't introduce duplicate messages", so the `duplicate` and
  `ghost` faults are refused (the other faults apply as on FakeQueue).

Not modelled: high-throughput mode (deduplication per message group), ReceiveRequestAttemptId,
SequenceNumber, the 300 transactions per second quota, and a DelaySeconds per queue.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

from models import ReceivedMessage
from tests.fake_queue import MAX_MESSAGES_PER_RECEIVE, FakeClock, FakeQueue, Faults, QueuedMessage

DEDUPLICATION_INTERVAL_SECONDS = 300  # SendMessage's MessageDeduplicationId: "the 5-minute deduplication interval"


class FakeFifoQueue(FakeQueue):
    """A FIFO SQS queue (see the module docstring). The messages given at construction belong to
    `groups` (one per message) and were sent long ago: none of them counts for deduplication."""

    def __init__(
        self,
        bodies: Sequence[tuple[str, str]] = (),
        faults: Faults | None = None,
        stored: Callable[[str], bool] | None = None,
        *,
        groups: Sequence[str] = (),
        content_based_deduplication: bool = False,
        clock: FakeClock | None = None,
        visibility_timeout_seconds: int = 30,
        max_receive_count: int | None = None,
    ) -> None:
        if faults is not None and (faults.duplicate or faults.ghost):
            raise ValueError("a FIFO queue does not introduce duplicates: set Faults.duplicate and .ghost to 0")
        super().__init__(
            bodies,
            faults,
            stored,
            clock=clock,
            visibility_timeout_seconds=visibility_timeout_seconds,
            max_receive_count=max_receive_count,
        )
        self.content_based_deduplication = content_based_deduplication
        self.groups = {message_id: group for (message_id, _), group in zip(bodies, groups, strict=True)}
        self._sent: dict[str, tuple[str, float]] = {}  # deduplication id -> MessageId, virtual send time
        self.long_poll_seconds = 5.0
        self._released = threading.Condition(self._lock)  # notified by deletes and visibility changes

    def send(self, body: str, *, group: str | None = None, deduplication_id: str | None = None) -> str:
        """SendMessage: a new message at the end of `group`, or, for a deduplication id sent within
        the interval, nothing new; the MessageId either way."""
        if group is None:
            raise ValueError("MissingParameter: a FIFO queue needs a MessageGroupId")
        if deduplication_id is None:
            if not self.content_based_deduplication:
                raise ValueError(
                    "InvalidParameterValue: the queue has no ContentBasedDeduplication; give a MessageDeduplicationId"
                )
            deduplication_id = hashlib.sha256(body.encode("utf-8")).hexdigest()
        with self._lock:
            now = self.clock.now()
            earlier = self._sent.get(deduplication_id)
            if earlier is not None and now - earlier[1] < DEDUPLICATION_INTERVAL_SECONDS:
                return earlier[0]  # accepted, not enqueued
            message_id = self._enqueue(body)
            self.groups[message_id] = group
            self._sent[deduplication_id] = (message_id, now)
        return message_id

    def receive(self, consumer: str = "") -> list[ReceivedMessage]:
        """ReceiveMessage, after waiting (the long poll) while every message left is in flight or
        behind one in flight."""
        deadline = time.monotonic() + self.long_poll_seconds
        with self._released:
            while self._only_blocked(self.clock.now()) and (left := deadline - time.monotonic()) > 0:
                # Short waits: a release between this check and the wait must not cost the whole poll.
                self._released.wait(min(left, 0.05))
        return super().receive(consumer)

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        try:
            return super().delete(messages)
        finally:
            with self._released:
                self._released.notify_all()

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        try:
            return super().change_visibility(messages, timeout_seconds)
        finally:
            with self._released:
                self._released.notify_all()

    def _only_blocked(self, now: float) -> bool:
        """True when messages are left and none of them can be delivered now (the caller holds the lock)."""
        left = [m for m in self._messages.values() if not m.deleted]
        busy = {self.groups[m.message_id] for m in left if m.visible_at > now}
        return bool(left) and all(self.groups[m.message_id] in busy for m in left)

    def _take(self, now: float) -> list[QueuedMessage]:
        """The visible messages of the groups with nothing in flight, in send order within each
        group, group after group (the group of the oldest first), at most 10."""
        busy = {self.groups[m.message_id] for m in self._messages.values() if not m.deleted and m.visible_at > now}
        waiting: dict[str, list[QueuedMessage]] = {}
        for message in self._messages.values():
            group = self.groups[message.message_id]
            if not message.deleted and group not in busy:
                waiting.setdefault(group, []).append(message)
        taken: list[QueuedMessage] = []
        for messages in waiting.values():
            for message in messages:
                if len(taken) == MAX_MESSAGES_PER_RECEIVE:
                    return taken
                if not self._redriven(message):
                    taken.append(message)
        return taken

    def group_of(self, message_id: str) -> str:
        """The MessageGroupId `message_id` was sent with."""
        return self.groups[message_id]
