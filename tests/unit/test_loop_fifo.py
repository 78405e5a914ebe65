"""The consume loop over a FIFO queue (tests/fake_fifo_queue.py): the ETL drains it exactly once.

The loop makes no promise about order (pipeline.py's docstring promises "no message lost, none
stored twice"), so these tests assert exactly-once only. A FIFO queue holds a group's next messages
back until the ones in flight are deleted, which the loop does only after their commit: the drain
must still end with the queue empty, not at an empty receive while groups wait.
"""

from __future__ import annotations

from collections import Counter

from etl.pipeline import Pipeline
from tests.fake_fifo_queue import FakeFifoQueue
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
