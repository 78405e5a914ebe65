"""The consume loop over a FIFO queue (tests/fake_fifo_queue.py): the ETL drains it exactly once.

The loop makes no promise about order (pipeline.py's docstring promises "no message lost, none
stored twice"), so these tests assert exactly-once only. A FIFO queue holds a group's next messages
back until the ones in flight are deleted, which the loop does only after their commit: the drain
must still end with the queue empty, not at an empty receive while groups wait.
"""

from __future__ import annotations

from collections import Counter

from etl.pipeline import Pipeline
from models import ReceivedMessage
from tests.fake_fifo_queue import FakeFifoQueue
from tests.fake_queue import FakeQueue, QueuedMessage
from tests.fakes import MASKER, FakeSink, body, options


def fifo_queue(sink: FakeSink, groups: int, per_group: int) -> tuple[FakeFifoQueue, list[str]]:
    """A FIFO queue with `groups` groups of `per_group` messages, interleaved, and a duplicate send
    of every seventh (same deduplication id, within the interval); the ids sent."""
    queue = FakeFifoQueue(stored=sink.holds)
    ids = []
    for n in range(groups * per_group):
        ids.append(queue.send(body(n), group=f"user-{n % groups}", deduplication_id=f"d{n}"))
    for n in range(0, groups * per_group, 7):
        assert queue.send(body(n), group=f"user-{n % groups}", deduplication_id=f"d{n}") == ids[n]
    return queue, ids


def test_the_loop_drains_a_fifo_queue_exactly_once() -> None:
    """GIVEN three groups of 40 (a group's next 10 are received only after its last 10 were deleted)
    WHEN the loop drains the queue with two receivers
    THEN every message is stored once, the duplicate sends not at all, nothing is deleted before its
    commit, and the queue is empty."""
    sink = FakeSink()
    queue, ids = fifo_queue(sink, groups=3, per_group=40)
    stats = Pipeline(queue, sink, MASKER, options(receivers=2, batch_size=25)).run()
    stored = Counter(message_id for table, message_id, _, _ in sink.tables.inserts if table == "user_logins")
    assert stored == Counter(ids)
    assert queue.early_deletes == [] and queue.left == 0
    assert (stats.received, stats.loaded, stats.rejected, stats.duplicates) == (120, 120, 0, 0)


def test_the_loop_drains_one_long_group_with_many_receivers_exactly_once() -> None:
    """GIVEN one group of 55: at any time, at most one receive can hold messages of it
    WHEN four receivers drain it
    THEN the receivers that find the group in flight wait, none ends the drain early, and every
    message is stored once."""
    sink = FakeSink()
    queue, ids = fifo_queue(sink, groups=1, per_group=55)
    stats = Pipeline(queue, sink, MASKER, options(receivers=4, batch_size=10)).run()
    stored = Counter(message_id for table, message_id, _, _ in sink.tables.inserts if table == "user_logins")
    assert stored == Counter(ids)
    assert queue.early_deletes == [] and queue.left == 0
    assert stats.received == 55


def test_a_drain_goes_on_while_its_own_messages_hold_their_group_back() -> None:
    """GIVEN one group of 30 on a FIFO queue whose empty receives answer at once (a short long poll:
    the commit and the delete of the group's first 10 take longer than the poll waits)
    WHEN two receivers drain it (a receive finds the group in flight, behind messages this process
    holds, and comes back empty)
    THEN the drain does not end at that empty receive: it goes on until its messages are deleted
    and the group's next ones delivered, and ends with the queue empty, every message stored once."""
    sink = FakeSink()
    queue, ids = fifo_queue(sink, groups=1, per_group=30)
    queue.long_poll_seconds = 0.0
    stats = Pipeline(queue, sink, MASKER, options(receivers=2, batch_size=10, fifo=True)).run()
    stored = Counter(message_id for table, message_id, _, _ in sink.tables.inserts if table == "user_logins")
    assert stored == Counter(ids)
    assert queue.early_deletes == [] and queue.left == 0
    assert stats.received == 30


def test_a_drain_of_a_standard_queue_still_ends_at_its_first_empty_receive() -> None:
    """GIVEN a standard queue (not FIFO), emptied by the first receive
    WHEN the loop drains it while the batch is still in hand
    THEN the receivers end at their empty receive (they do not poll again until the batch is
    deleted): the drain's end is not held up by a long poll per receiver."""
    sink = FakeSink()
    queue = FakeQueue([(f"m{n}", body(n)) for n in range(5)], stored=sink.holds)
    answers: list[int] = []
    receive = queue.receive

    def counted(consumer: str = "") -> list[ReceivedMessage]:
        messages = receive(consumer)
        answers.append(len(messages))
        return messages

    queue.receive = counted  # type: ignore[method-assign]
    stats = Pipeline(queue, sink, MASKER, options(receivers=2, batch_size=100, flush_seconds=0.05)).run()
    assert stats.received == 5 and queue.left == 0
    assert sorted(answers) == [0, 0, 5]  # the first receive takes all 5; each receiver ends at its empty one


class OneAtATime(FakeFifoQueue):
    """A FIFO queue whose receives deliver one message each: SQS may return fewer messages than
    MaxNumberOfMessages asks for (ReceiveMessage, "fewer messages ... might be returned")."""

    def _take(self, now: float) -> list[QueuedMessage]:
        return super()._take(now)[:1]


def test_a_drain_goes_on_while_a_single_message_holds_its_group_back() -> None:
    """GIVEN one group of 5 on a FIFO queue that delivers one message a receive, at once
    WHEN one receiver drains it (each next receive finds the group behind the one message in hand)
    THEN the drain goes on until each is deleted: all 5 are stored and the queue is empty."""
    sink = FakeSink()
    queue = OneAtATime(stored=sink.holds)
    queue.long_poll_seconds = 0.0
    ids = [queue.send(body(n), group="user-0", deduplication_id=f"d{n}") for n in range(5)]
    stats = Pipeline(queue, sink, MASKER, options(receivers=1, batch_size=1, fifo=True)).run()
    assert stats.received == 5 and queue.left == 0
    assert sorted(sink.logins) == sorted(ids)
