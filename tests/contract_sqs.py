"""The SQS contract: scenario functions run on FakeQueue (tests/unit/test_contract_fake.py) and on
SqsReader over each emulator (tests/integration/test_contract_sqs.py). Each asserts what the SQS
documentation says; where an emulator differs, its test marks the difference (xfail, with the
documented behaviour and the emulator's), never silently.

A scenario gets a factory: `make(visibility_timeout_seconds, max_receive_count=None)` returns a
`QueueUnderTest`. Times are short (a 2-second timeout), so each scenario takes a few seconds on an
emulator and none on the fake (its clock is virtual). The FIFO scenarios get
`make_fifo(visibility_timeout_seconds=30, *, content_based_deduplication=False)`, which returns a
`FifoQueueUnderTest`; those in FAKE_ONLY_FIFO_SCENARIOS run on the fake alone, each for the reason
given there (the emulator tests list them as skipped with it).
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


def receive_all(queue: QueueUnderTest | FifoQueueUnderTest, attempts: int = 3) -> list[ReceivedMessage]:
    """Receive until `attempts` empty answers in a row (an emulator may return fewer than are
    visible). Bounded: a queue that keeps answering fails the scenario instead of hanging it."""
    got: list[ReceivedMessage] = []
    empty = 0
    for _ in range(100):
        batch = queue.receive()
        got += batch
        empty = 0 if batch else empty + 1
        if empty == attempts:
            return got
    raise AssertionError(f"still receiving after 100 calls ({len(got)} messages)")


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
    """One FIFO queue: sends with a MessageGroupId and a MessageDeduplicationId (none: the queue's
    content-based deduplication), the reader's receive and delete, and the clock."""

    def send(self, body: str, *, group: str, deduplication_id: str | None = None) -> str: ...
    def receive(self) -> list[ReceivedMessage]: ...
    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]: ...
    def now(self) -> float: ...
    def sleep_until(self, when: float) -> None: ...


# make_fifo(visibility_timeout_seconds=30, *, content_based_deduplication=False)
MakeFifo = Callable[..., FifoQueueUnderTest]


def a_fifo_queue_keeps_order_within_a_group_and_drops_a_duplicate_send(make_fifo: MakeFifo) -> None:
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


def drain(queue: FifoQueueUnderTest, rounds: int = 20) -> list[str]:
    """Receive and delete until an empty answer; the bodies in the order received. Bounded: a queue
    that keeps answering fails the scenario instead of hanging it."""
    bodies: list[str] = []
    for _ in range(rounds):
        batch = queue.receive()
        if not batch:
            return bodies
        bodies += [m.body for m in batch]
        assert queue.delete(batch) == []
    raise AssertionError(f"still receiving after {rounds} rounds: {bodies[:20]}")


def a_fifo_group_waits_while_its_head_is_in_flight_and_other_groups_go_on(make_fifo: MakeFifo) -> None:
    """While a message of a group is in flight, no later message of that group is received ("you
    can't receive additional messages from the same message group ID unless the messages currently
    received are deleted or become visible again", FIFO queue delivery logic); the other groups'
    messages are. Its delete releases the group."""
    queue = make_fifo(30)
    queue.send("a1", group="a", deduplication_id="a1")
    [head] = queue.receive()
    queue.send("a2", group="a", deduplication_id="a2")
    queue.send("b1", group="b", deduplication_id="b1")
    others = receive_all(queue)
    assert [m.body for m in others] == ["b1"], "group a waits for its head, group b does not"
    assert queue.delete(others) == []
    assert receive_all(queue) == [], "the head still in flight: group a still waits"
    assert queue.delete([head]) == []
    assert drain(queue) == ["a2"]


def a_fifo_group_is_released_when_its_heads_visibility_timeout_passes(make_fifo: MakeFifo) -> None:
    """A head whose visibility timeout passed is visible again: it is received again first (a new
    receipt handle, ApproximateReceiveCount 2), and the rest of its group after it, in order."""
    queue = make_fifo(2)
    queue.send("a1", group="a", deduplication_id="a1")
    [head] = queue.receive()
    received = queue.now()
    queue.send("a2", group="a", deduplication_id="a2")
    assert receive_all(queue) == [], "the head in flight: group a waits"
    queue.sleep_until(received + 3)
    again = receive_all(queue, attempts=1)
    assert again[0].body == "a1" and again[0].receive_count == 2
    assert again[0].receipt_handle != head.receipt_handle
    assert queue.delete(again) == []
    assert [m.body for m in again] + drain(queue) == ["a1", "a2"]


def a_fifo_deduplication_id_is_remembered_after_its_message_is_deleted(make_fifo: MakeFifo) -> None:
    """ "Amazon SQS continues to keep track of the message deduplication ID even after the message is
    received and deleted" (SendMessage, MessageDeduplicationId): a send with that id within the
    5-minute interval is accepted and not delivered."""
    queue = make_fifo(30)
    queue.send("a1", group="a", deduplication_id="x")
    assert drain(queue) == ["a1"]
    queue.send("a1 again", group="a", deduplication_id="x")
    queue.send("b1", group="b", deduplication_id="y")
    assert drain(queue) == ["b1"]


def content_based_deduplication_drops_a_send_of_the_same_body(make_fifo: MakeFifo) -> None:
    """With ContentBasedDeduplication, a send without a MessageDeduplicationId is deduplicated by the
    SHA-256 of its body, across message groups (the scope is the queue); an explicit id overrides the
    generated one."""
    queue = make_fifo(30, content_based_deduplication=True)
    queue.send("same", group="a")
    queue.send("same", group="b")
    queue.send("other", group="a")
    queue.send("same", group="a", deduplication_id="explicit")
    assert drain(queue) == ["same", "other", "same"]


def a_fifo_deduplication_id_is_forgotten_after_five_minutes(make_fifo: MakeFifo) -> None:
    """The deduplication interval is 5 minutes from the send: a send with the same id just before
    it ends is dropped, one after it is delivered."""
    queue = make_fifo(30)
    queue.send("a1", group="a", deduplication_id="x")
    sent = queue.now()
    assert drain(queue) == ["a1"]
    queue.sleep_until(sent + 299)
    queue.send("a1 within", group="a", deduplication_id="x")
    assert drain(queue) == []
    queue.sleep_until(sent + 301)
    queue.send("a1 after", group="a", deduplication_id="x")
    assert drain(queue) == ["a1 after"]


FIFO_SCENARIOS = [
    a_fifo_queue_keeps_order_within_a_group_and_drops_a_duplicate_send,
    a_fifo_group_waits_while_its_head_is_in_flight_and_other_groups_go_on,
    a_fifo_group_is_released_when_its_heads_visibility_timeout_passes,
    a_fifo_deduplication_id_is_remembered_after_its_message_is_deleted,
    content_based_deduplication_drops_a_send_of_the_same_body,
]
# Scenarios only the fakes run, each with why an emulator cannot (the emulator tests list them as
# skipped with this reason).
FAKE_ONLY_FIFO_SCENARIOS: dict[Callable[[MakeFifo], None], str] = {
    a_fifo_deduplication_id_is_forgotten_after_five_minutes: (
        "it waits out the 5-minute deduplication interval: neither emulator's clock can be moved from a "
        "test (moto's /moto-api/time/set would freeze the shared server the KMS tests use too), and 5 "
        "real minutes per run is too long"
    ),
}
