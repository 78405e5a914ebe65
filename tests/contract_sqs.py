"""The SQS contract: scenario functions run on FakeQueue (tests/unit/test_contract_fake.py) and on
SqsReader over each emulator (tests/integration/test_contract_sqs.py). Each asserts what the SQS
documentation says; where an emulator differs, its test marks the difference (xfail, with the
documented behaviour and the emulator's), never silently.

A scenario gets a factory: `make(visibility_timeout_seconds, max_receive_count=None)` returns a
`QueueUnderTest`. Times are short (a 2-second timeout), so each scenario takes a few seconds on an
emulator and none on the fake (its clock is virtual).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from models import ReceivedMessage


class QueueUnderTest(Protocol):
    """One queue, seen through the ETL's reader (receive, delete, change_visibility) plus what a
    test needs around it: send, the clock, the dead-letter queue."""

    def send(self, body: str) -> str: ...
    def receive(self) -> list[ReceivedMessage]: ...
    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]: ...
    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]: ...
    def now(self) -> float: ...
    def sleep_until(self, when: float) -> None: ...
    def dead_letters(self) -> list[str]: ...


Make = Callable[..., QueueUnderTest]


def receive_all(queue: QueueUnderTest, attempts: int = 3) -> list[ReceivedMessage]:
    """Receive until an empty answer (an emulator may return fewer than are visible)."""
    got: list[ReceivedMessage] = []
    empty = 0
    while empty < attempts:
        batch = queue.receive()
        got += batch
        empty = 0 if batch else empty + 1
    return got


def visibility_is_set_extended_and_expires(make: Make) -> None:
    """ReceiveMessage hides a message for the queue's VisibilityTimeout; ChangeMessageVisibility
    counts the new timeout from the call; once it passes the message is received again, with a new
    receipt handle and ApproximateReceiveCount 2; a timeout of 0 makes it visible at once."""
    queue = make(2)
    message_id = queue.send("a")
    [first] = queue.receive()
    received = queue.now()
    assert first.message_id == message_id and first.receive_count == 1
    assert queue.receive() == []  # hidden
    assert queue.change_visibility([first], 5) == []
    extended = queue.now()
    queue.sleep_until(received + 3)  # past the first deadline, before the extended one
    assert queue.receive() == [], "still hidden: the extension counts from the call"
    queue.sleep_until(extended + 6)
    [second] = receive_all(queue)
    assert second.message_id == message_id and second.receive_count == 2
    assert second.receipt_handle != first.receipt_handle
    assert queue.change_visibility([second], 0) == []
    [third] = queue.receive()
    assert third.receive_count == 3


def a_message_not_in_flight_cannot_be_extended(make: Make) -> None:
    """ChangeMessageVisibility of a message whose timeout has passed fails (MessageNotInflight):
    the ETL's keeper then stops tracking it (aws/visibility.py)."""
    queue = make(1)
    queue.send("a")
    [message] = queue.receive()
    queue.sleep_until(queue.now() + 2)
    assert queue.change_visibility([message], 30) == [message.receipt_handle]


def a_stale_receipt_handle_deletes_nothing(make: Make) -> None:
    """DeleteMessage must be given the latest receipt handle; "otherwise, the request succeeds, but
    the message will not be deleted" (DeleteMessage, API reference)."""
    queue = make(30)
    queue.send("a")
    [first] = queue.receive()
    assert queue.change_visibility([first], 0) == []
    [second] = queue.receive()
    assert queue.delete([first]) == []  # succeeds ...
    assert queue.change_visibility([second], 0) == []
    assert [m.message_id for m in receive_all(queue)] == [first.message_id], "... and deletes nothing"


def a_batch_delete_refuses_only_its_invalid_entries(make: Make) -> None:
    """DeleteMessageBatch answers each entry: the invalid receipt handle is in Failed
    (ReceiptHandleIsInvalid), the valid one is deleted."""
    queue = make(30)
    queue.send("a")
    [good] = queue.receive()
    bogus = ReceivedMessage("not-a-message", "bm90IGEgcmVjZWlwdCBoYW5kbGU=", "", None)
    assert queue.delete([good, bogus]) == ["not-a-message"]
    assert queue.change_visibility([good], 0) == [good.receipt_handle]  # deleted: not in flight
    assert receive_all(queue) == []


def a_receive_returns_at_most_ten(make: Make) -> None:
    """ReceiveMessage returns at most 10 messages (MaxNumberOfMessages 1-10)."""
    queue = make(30)
    for n in range(15):
        queue.send(f"m{n}")
    first = queue.receive()
    assert 1 <= len(first) <= 10
    rest = receive_all(queue)
    assert len(first) + len(rest) == 15 and all(len(batch) <= 10 for batch in (first, rest[:10]))


def redrive_moves_a_message_after_max_receive_count(make: Make) -> None:
    """With a RedrivePolicy, a message received maxReceiveCount times is moved to the dead-letter
    queue instead of being received once more."""
    queue = make(30, max_receive_count=2)
    message_id = queue.send("a")
    for count in (1, 2):
        [message] = queue.receive()
        assert message.receive_count == count
        assert queue.change_visibility([message], 0) == []
    assert receive_all(queue) == []
    assert queue.dead_letters() == [message_id]


SCENARIOS = [
    visibility_is_set_extended_and_expires,
    a_message_not_in_flight_cannot_be_extended,
    a_stale_receipt_handle_deletes_nothing,
    a_batch_delete_refuses_only_its_invalid_entries,
    a_receive_returns_at_most_ten,
    redrive_moves_a_message_after_max_receive_count,
]


class FifoQueueUnderTest(Protocol):
    def send(self, body: str, *, group: str, deduplication_id: str) -> str: ...
    def receive(self) -> list[ReceivedMessage]: ...
    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]: ...


def a_fifo_queue_keeps_order_within_a_group_and_drops_a_duplicate_send(
    make_fifo: Callable[[], FifoQueueUnderTest],
) -> None:
    """FIFO queues deliver the messages of one MessageGroupId in the order sent, and a send with a
    MessageDeduplicationId already used (within 5 minutes) is accepted and not delivered again."""
    queue = make_fifo()
    sent = [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2"), ("a", "a3")]
    for group, body in sent:
        queue.send(body, group=group, deduplication_id=body)
    queue.send("a2", group="a", deduplication_id="a2")  # a duplicate send
    bodies: list[str] = []
    for _ in range(10):
        batch = queue.receive()
        if not batch:
            break
        bodies += [m.body for m in batch]
        assert queue.delete(batch) == []
    assert sorted(bodies) == ["a1", "a2", "a3", "b1", "b2"]
    assert [b for b in bodies if b.startswith("a")] == ["a1", "a2", "a3"]
    assert [b for b in bodies if b.startswith("b")] == ["b1", "b2"]


FIFO_SCENARIOS = [a_fifo_queue_keeps_order_within_a_group_and_drops_a_duplicate_send]
