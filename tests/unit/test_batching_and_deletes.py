"""The Batcher's cuts and the Deleters' promises, each alone (the loop's tests and the simulation
run them only together): a batch is cut at its size, its bytes, its age, or when every receiver
has finished; each chunk's delete is retried, what it did not delete counted and the chunk untracked
once, a delete refused for good reported as fatal, a hung call abandoned at close's time limit and
its late end ignored, back-pressure gives up when told to."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import date

import pytest

from aws.sqs import QueueUnusable, SqsUnavailable
from config import PipelineOptions
from etl.batch import Batch, Batcher, BytesInHand, Inbox, Prepared, RecentQuarantine
from etl.commit import write_batch
from etl.deletes import Deleters
from etl.observability import Stats
from etl.retry import Retrier, StopState
from models import Backoff, MaskedLogin, ReceivedMessage, Rejection, WriteResult
from tests.fakes import FakeClock


def part(n: int, *, size: int = 1, nbytes: int = 0) -> Prepared:
    return Prepared([ReceivedMessage(f"m{n}-{i}", f"r{n}-{i}", "{}") for i in range(size)], nbytes=nbytes)


def batcher(
    parts: Sequence[Prepared | None],
    *,
    receivers: int = 1,
    batch_size: int = 100,
    batch_bytes: int = 10**9,
    flush_seconds: float = 60.0,
) -> Batcher:
    inbox = Inbox(maxsize=max(1, len(parts)))
    for item in parts:
        inbox.put(item)
    options = PipelineOptions(receivers=receivers, batch_size=batch_size, flush_seconds=flush_seconds)
    return Batcher(inbox, options, batch_bytes=batch_bytes, on_turn=lambda: None)


def sizes(batches: Sequence[Sequence[Prepared]]) -> list[int]:
    return [sum(len(p.messages) for p in batch) for batch in batches]


def drain(b: Batcher) -> list[list[Prepared]]:
    taken = []
    while (batch := b.take()) is not None:
        taken.append(batch)
    return taken


def test_a_batch_is_cut_when_it_holds_batch_size_messages_counted_in_messages_not_receives() -> None:
    b = batcher([part(0, size=2), part(1, size=2), part(2, size=1), part(3, size=3), None], batch_size=3)
    assert sizes(drain(b)) == [4, 4]


def test_a_batch_is_cut_when_it_holds_batch_bytes_and_the_count_starts_again_after_a_cut() -> None:
    parts = [part(n, nbytes=50) for n in range(5)]
    b = batcher([*parts, None], batch_bytes=100)
    assert [len(batch) for batch in drain(b)] == [2, 2, 1]


def test_a_batch_is_cut_at_exactly_batch_bytes_and_batch_size_from_the_first_batch_on() -> None:
    """99 bytes is not yet a batch of 100, 100 is; a batch of 2 messages is cut at 2, each time."""
    b = batcher([part(n, nbytes=nbytes) for n, nbytes in enumerate([99, 1, 99, 1])] + [None], batch_bytes=100)
    assert [[p.nbytes for p in batch] for batch in drain(b)] == [[99, 1], [99, 1]]
    b = batcher([part(n) for n in range(4)] + [None], batch_size=2)
    assert sizes(drain(b)) == [2, 2]


def test_an_old_enough_batch_is_cut_while_receivers_still_run_and_the_batcher_does_not_spin() -> None:
    """Nothing more arrives and the receiver has not finished: the batch goes at its age, having
    waited on the inbox (a turn or two), not polled it in a loop."""
    inbox = Inbox(maxsize=100)
    turns: list[int] = []
    b = Batcher(
        inbox, PipelineOptions(receivers=1, flush_seconds=0.1), batch_bytes=10**9, on_turn=lambda: turns.append(1)
    )
    inbox.put(part(0))
    started = time.monotonic()
    assert len(b.take() or []) == 1
    assert time.monotonic() - started < 0.6
    assert len(turns) <= 5


def test_the_age_of_a_batch_counts_from_its_first_message() -> None:
    """After a cut the next batch's age starts at its own first message, not the previous one's."""
    inbox = Inbox(maxsize=100)
    b = Batcher(inbox, PipelineOptions(receivers=1, flush_seconds=0.3), batch_bytes=10**9, on_turn=lambda: None)
    inbox.put(part(0))
    assert len(b.take() or []) == 1  # cut at 0.3 s
    time.sleep(0.35)
    inbox.put(part(1))
    inbox.put(part(2))
    started = time.monotonic()
    assert len(b.take() or []) == 2  # both: the batch waited its own 0.3 s for the second
    assert time.monotonic() - started >= 0.2


def test_the_last_batch_goes_when_every_receiver_has_finished_and_then_none() -> None:
    b = batcher([part(0), None, part(1), None], receivers=2)
    assert sizes(drain(b)) == [2]
    assert b.take() is None


def test_the_batcher_takes_a_turn_for_each_item_and_each_idle_wait() -> None:
    inbox = Inbox(maxsize=100)
    turns: list[float] = []
    b = Batcher(inbox, PipelineOptions(receivers=1), batch_bytes=10**9, on_turn=lambda: turns.append(1))
    inbox.put(part(0))
    inbox.put(None)
    assert sizes(drain(b)) == [1]
    assert len(turns) == 2


def waiting(inbox: Inbox, messages: int, nbytes: int = 10**9) -> threading.Thread:
    """A taker waiting (at most 30 s) for `messages` messages or `nbytes` bytes."""
    taker = threading.Thread(target=inbox.wait, args=(30, messages, nbytes), daemon=True)
    taker.start()
    time.sleep(0.05)  # asleep in wait()
    return taker


def test_the_inbox_wakes_its_taker_when_what_it_waits_for_has_come_not_at_each_put() -> None:
    """GIVEN a taker waiting for 3 messages WHEN parts of 1 message come THEN it sleeps through the
    first two and wakes at the third; bytes wake it the same way."""
    inbox = Inbox(maxsize=10)
    taker = waiting(inbox, 3)
    inbox.put(part(0))
    inbox.put(part(1))
    taker.join(0.3)
    assert taker.is_alive(), "woken before the batch could be cut"
    inbox.put(part(2))
    taker.join(10)
    assert not taker.is_alive()
    for _ in range(3):
        inbox.get_nowait()
    taker = waiting(inbox, 100, nbytes=100)
    inbox.put(part(3, nbytes=99))
    taker.join(0.3)
    assert taker.is_alive()
    inbox.put(part(4, nbytes=1))
    taker.join(10)
    assert not taker.is_alive()


def test_the_inbox_wakes_its_taker_at_a_receivers_end_and_at_its_timeout() -> None:
    inbox = Inbox(maxsize=10)
    taker = waiting(inbox, 100)
    inbox.put(None)
    taker.join(10)
    assert not taker.is_alive()
    assert inbox.get_nowait() is None
    started = time.monotonic()
    inbox.wait(0.1, 100, 10**9)
    assert time.monotonic() - started >= 0.09
    with pytest.raises(queue.Empty):
        inbox.get_nowait()


def test_a_wait_for_what_the_inbox_holds_already_returns_at_once() -> None:
    """A part put between the taker's look and its wait is not slept through."""
    inbox = Inbox(maxsize=10)
    inbox.put(part(0, nbytes=5))
    for messages, nbytes in ((1, 10**9), (100, 5)):
        started = time.monotonic()
        inbox.wait(10, messages, nbytes)
        assert time.monotonic() - started < 5


def test_the_first_part_wakes_an_idle_writer_at_once() -> None:
    """GIVEN the writer idle on an empty inbox WHEN one receive of one message (no bytes counted)
    comes THEN its batch is cut at its own age, not after the idle wait (0.5 s) as well."""
    inbox = Inbox(maxsize=10)
    b = Batcher(inbox, PipelineOptions(receivers=1, flush_seconds=0.05), batch_bytes=10**9, on_turn=lambda: None)
    threading.Timer(0.05, inbox.put, args=(part(0),)).start()
    started = time.monotonic()
    assert sizes([b.take() or []]) == [1]
    assert time.monotonic() - started < 0.4  # 0.1 s; 0.6 s if only the idle wait's end saw it


def returns_at_once(inbox: Inbox, messages: int, nbytes: int, *, timeout: float = 10.0) -> bool:
    started = time.monotonic()
    inbox.wait(timeout, messages, nbytes)
    return time.monotonic() - started < timeout / 2


def test_the_inbox_counts_what_it_still_holds_as_items_are_taken() -> None:
    """What a wait compares with is what is left: parts' messages and bytes, and receivers' ends."""
    inbox = Inbox(maxsize=10)
    for n in range(3):
        inbox.put(part(n, nbytes=5))
    inbox.put(None)
    inbox.put(None)
    inbox.get_nowait()  # left: 2 parts (2 messages, 10 bytes), 2 ends
    inbox.get_nowait()
    inbox.get_nowait()
    inbox.get_nowait()  # left: one end
    assert returns_at_once(inbox, 100, 10**9)
    inbox.get_nowait()
    assert not returns_at_once(inbox, 1, 1, timeout=0.2)
    for n in range(3):
        inbox.put(part(n, nbytes=5))
    inbox.get_nowait()  # left: 2 messages, 10 bytes
    assert returns_at_once(inbox, 2, 10**9) and returns_at_once(inbox, 100, 10)
    assert not returns_at_once(inbox, 3, 10**9, timeout=0.2)
    assert not returns_at_once(inbox, 100, 11, timeout=0.2)


def test_every_receiver_waiting_for_room_gets_in() -> None:
    """Two receivers wait on a full inbox of one: each take lets one in, none is left waiting."""
    inbox = Inbox(maxsize=1)
    inbox.put(part(0))
    putters = [threading.Thread(target=inbox.put, args=(part(n),), daemon=True) for n in (1, 2)]
    for putter in putters:
        putter.start()
    time.sleep(0.1)  # both waiting
    taken: list[Prepared | None] = []
    deadline = time.monotonic() + 10
    while len(taken) < 3 and time.monotonic() < deadline:
        try:
            taken.append(inbox.get_nowait())
        except queue.Empty:
            time.sleep(0.01)
    assert len(taken) == 3, "a receiver was left waiting for room"
    for putter in putters:
        putter.join(1)
        assert not putter.is_alive()


def test_a_full_inbox_holds_its_putters_until_the_taker_takes_in_order() -> None:
    inbox = Inbox(maxsize=2)
    inbox.put(part(0))
    inbox.put(part(1))
    putter = threading.Thread(target=inbox.put, args=(part(2),), daemon=True)
    putter.start()
    putter.join(0.2)
    assert putter.is_alive(), "put past the bound"
    first = inbox.get_nowait()
    putter.join(10)
    assert not putter.is_alive()
    rest = [inbox.get_nowait(), inbox.get_nowait()]
    assert [p.messages[0].message_id for p in [first, *rest] if p is not None] == ["m0-0", "m1-0", "m2-0"]


def test_the_writer_is_woken_once_per_batch_not_once_per_receive() -> None:
    """GIVEN a batch of 50 messages coming as 50 receives of one, from 5 threads WHEN the batcher
    takes it THEN it waited (a turn) a few times, not once per receive."""
    inbox = Inbox(maxsize=100)
    turns: list[int] = []
    b = Batcher(inbox, PipelineOptions(receivers=5, batch_size=50), batch_bytes=10**9, on_turn=lambda: turns.append(1))
    waits: list[int] = []
    plain_wait = inbox.wait

    def counted(timeout: float, messages: int, nbytes: int) -> None:
        waits.append(messages)
        plain_wait(timeout, messages, nbytes)

    inbox.wait = counted  # type: ignore[method-assign]

    def receiver(n: int) -> None:
        for i in range(10):
            inbox.put(part(n * 10 + i))
            time.sleep(0.001)

    threads = [threading.Thread(target=receiver, args=(n,), daemon=True) for n in range(5)]
    for thread in threads:
        thread.start()
    assert sizes([b.take() or []]) == [50]
    assert len(waits) <= 5, waits  # the first part, then the rest of the batch (a few if they race)


@pytest.mark.parametrize(("limit", "per_receive", "cut"), [(100, 30, 50), (100, 70, 30), (1, 1, 1), (10, 50, 1)])
def test_a_batch_is_cut_at_half_the_bound_or_less_so_that_a_receive_still_fits(
    limit: int, per_receive: int, cut: int
) -> None:
    assert BytesInHand(limit, per_receive).batch_bytes == cut


# -- Deleters -------------------------------------------------------------------------------------------


class Recorder:
    """What the deleters report: the chunks untracked (each once), the failures counted, the fatal errors."""

    def __init__(self) -> None:
        self.untracked: list[list[str]] = []
        self.stats = Stats()
        self.fatal: list[BaseException] = []
        self.lock = threading.Lock()

    def untrack(self, chunk: Sequence[ReceivedMessage]) -> None:
        with self.lock:
            self.untracked.append([m.message_id for m in chunk])

    def fail(self, exc: BaseException) -> None:
        self.fatal.append(exc)


def deleters(
    delete: Callable[[Sequence[ReceivedMessage]], Sequence[str]], *, threads: int, max_calls: int
) -> tuple[Deleters, Recorder]:
    """Deleters over `delete` (a source's: the ids it refused), retried for 5 s of a clock that never
    really sleeps, and what they report."""
    done = Recorder()
    retrier = Retrier(Backoff(1, 1), StopState(FakeClock()), budget_seconds=5)
    made = Deleters(
        delete, retrier, untrack=done.untrack, stats=done.stats, fail=done.fail, threads=threads, max_calls=max_calls
    )
    return made, done


def delete_all(
    delete: Callable[[Sequence[ReceivedMessage]], Sequence[str]], *names: str, threads: int = 1, max_calls: int = 4
) -> Recorder:
    """Deleters over `delete` given a chunk per name, then closed with time to spare (none abandoned)."""
    made, done = deleters(delete, threads=threads, max_calls=max_calls)
    made.start()
    for name in names:
        made.submit(chunk(name), never)
    assert made.close(time.monotonic() + 5) == 0
    return done


def chunk(name: str, size: int = 2) -> list[ReceivedMessage]:
    return [ReceivedMessage(f"{name}{i}", f"r-{name}{i}", "{}") for i in range(size)]


def never() -> bool:
    return False


def test_each_chunk_is_untracked_once_and_what_its_delete_did_not_delete_is_counted() -> None:
    done = delete_all(lambda c: ["b0"] if c[0].message_id == "b0" else [], "a", "b", threads=2)
    assert sorted(done.untracked) == [["a0", "a1"], ["b0", "b1"]]
    assert done.stats.delete_failures == 1 and done.fatal == []


def test_the_delete_threads_are_daemons_and_run_side_by_side() -> None:
    both_in = threading.Barrier(2, timeout=5)
    names: set[str] = set()

    def delete(c: Sequence[ReceivedMessage]) -> list[str]:
        names.add(threading.current_thread().name)
        assert threading.current_thread().daemon
        both_in.wait()  # only passes when two calls run at once
        return []

    done = delete_all(delete, "a", "b", threads=2, max_calls=2)
    assert names == {"deleter-0", "deleter-1"}
    assert len(done.untracked) == 2 and done.stats.delete_failures == 0


def test_a_delete_that_raises_counts_its_chunk_as_not_deleted_and_the_thread_goes_on() -> None:
    def delete(c: Sequence[ReceivedMessage]) -> list[str]:
        if c[0].message_id == "a0":
            raise RuntimeError("a bug")
        return []

    done = delete_all(delete, "a", "b")
    assert done.untracked == [["a0", "a1"], ["b0", "b1"]]
    assert done.stats.delete_failures == 2 and done.fatal == []


def test_a_delete_that_keeps_failing_is_retried_then_counted_as_not_deleted() -> None:
    calls: list[int] = []

    def delete(c: Sequence[ReceivedMessage]) -> list[str]:
        calls.append(1)
        raise SqsUnavailable("DeleteMessageBatch failed: fake outage")

    done = delete_all(delete, "a")
    assert len(calls) > 1 and done.untracked == [["a0", "a1"]]
    assert done.stats.delete_failures == 2 and done.fatal == []


def test_a_delete_refused_for_good_is_reported_as_fatal_and_its_chunk_untracked() -> None:
    def delete(c: Sequence[ReceivedMessage]) -> list[str]:
        raise QueueUnusable("DeleteMessageBatch failed: AWS.SimpleQueueService.NonExistentQueue")

    done = delete_all(delete, "a")
    [fatal] = done.fatal
    assert isinstance(fatal, QueueUnusable)
    assert done.untracked == [["a0", "a1"]] and done.stats.delete_failures == 2


def test_a_call_that_has_not_returned_by_the_time_limit_is_abandoned_and_its_late_end_ignored() -> None:
    entered, release = threading.Event(), threading.Event()

    def delete(c: Sequence[ReceivedMessage]) -> list[str]:
        entered.set()
        release.wait(10)
        return []

    made, done = deleters(delete, threads=1, max_calls=4)
    made.start()
    made.submit(chunk("a", 3), never)
    assert entered.wait(5)
    started = time.monotonic()
    assert made.close(time.monotonic() + 0.2) == 3
    assert time.monotonic() - started < 2
    assert done.untracked == [["a0", "a1", "a2"]] and done.stats.delete_failures == 3
    release.set()
    time.sleep(0.2)  # the late end: no second report
    assert done.untracked == [["a0", "a1", "a2"]] and done.stats.delete_failures == 3


def test_close_waits_for_the_calls_outstanding_until_the_time_limit() -> None:
    def delete(c: Sequence[ReceivedMessage]) -> list[str]:
        time.sleep(0.2)
        return []

    done = delete_all(delete, "a", "b")
    assert sorted(done.untracked) == [["a0", "a1"], ["b0", "b1"]] and done.stats.delete_failures == 0


def test_with_every_slot_taken_a_submit_gives_up_when_told_and_the_chunk_is_abandoned() -> None:
    release = threading.Event()

    def delete(c: Sequence[ReceivedMessage]) -> list[str]:
        release.wait(10)
        return []

    made, done = deleters(delete, threads=2, max_calls=1)
    made.start()
    made.submit(chunk("a"), never)
    asked: list[int] = []

    def give_up() -> bool:
        asked.append(1)
        return len(asked) >= 3

    made.submit(chunk("b", 3), give_up)  # no slot: waits, then gives up
    assert len(asked) == 3
    assert done.untracked == [["b0", "b1", "b2"]] and done.stats.delete_failures == 3
    made.submit(chunk("c", 2), lambda: True)
    release.set()
    assert made.close(time.monotonic() + 5) == 5  # b's 3 and c's 2, counted in submit; a deleted
    assert sorted(done.untracked) == [["a0", "a1"], ["b0", "b1", "b2"], ["c0", "c1"]]
    assert done.stats.delete_failures == 5


def test_a_submit_waiting_for_a_slot_abandons_its_chunk_at_once_when_told_to_give_up() -> None:
    """GIVEN every slot taken by a call that hangs
    WHEN a submit waiting for a slot is told to give up (the stop's time limit has passed)
    THEN its chunk is abandoned within a few tenths of a second, not after a long wait."""
    release = threading.Event()

    def delete(c: Sequence[ReceivedMessage]) -> list[str]:
        release.wait(10)
        return []

    made, done = deleters(delete, threads=1, max_calls=1)
    made.start()
    made.submit(chunk("a"), never)
    started = time.monotonic()
    made.submit(chunk("b"), lambda: time.monotonic() - started > 0.05)
    assert time.monotonic() - started < 0.7
    assert done.untracked == [["b0", "b1"]] and done.stats.delete_failures == 2
    release.set()
    assert made.close(time.monotonic() + 5) == 2


def test_a_submit_after_close_is_abandoned_at_once() -> None:
    made, done = deleters(lambda c: [], threads=1, max_calls=2)
    made.start()
    assert made.close(time.monotonic() + 5) == 0
    made.submit(chunk("late"), never)
    assert done.untracked == [["late0", "late1"]] and done.stats.delete_failures == 2


# -- write_batch: what the sink is told about the one-table check -----------------------------------


class RecordingSink:
    """A BatchSink that records the keyword arguments of each write."""

    connected = True

    def __init__(self) -> None:
        self.writes: list[dict[str, object]] = []

    def connect(self) -> None:
        pass

    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        self.writes.append({"redelivered": redelivered, "received_since": received_since})
        return WriteResult(inserted=len(logins), rejected=len(rejections), duplicates=0)


def received(message_id: str, *, receive_count: int = 1, received_at: float = 0.0) -> Prepared:
    return Prepared(
        [ReceivedMessage(message_id, f"r-{message_id}", "{}", receive_count=receive_count, received_at=received_at)]
    )


@pytest.mark.parametrize(
    ("parts", "quarantined", "check"),
    [
        ([received("a"), received("b")], [], False),  # first deliveries, nothing quarantined here
        ([received("a"), received("b", receive_count=2)], [], True),  # one redelivered
        ([received("a")], ["a"], True),  # a first delivery of a message quarantined lately
        ([received("a")], ["z"], False),
    ],
)
def test_a_batch_takes_the_one_table_check_when_a_message_of_it_may_have_been_seen_before(
    parts: list[Prepared], quarantined: list[str], check: bool
) -> None:
    sink = RecordingSink()
    recent = RecentQuarantine()
    recent.remember(quarantined)
    batch = Batch(parts)
    batch.rows = {m.message_id: masked_row(m.message_id) for m in batch.messages}
    write_batch(sink, batch, recent)
    assert sink.writes[0]["redelivered"] is check


def test_a_batch_is_checked_against_quarantines_since_its_earliest_receive() -> None:
    """received_since: the earliest receive of the batch's messages; 0.0 (unknown: the sink always
    checks) for a batch without messages."""
    sink = RecordingSink()
    write_batch(sink, Batch([received("a", received_at=12.5), received("b", received_at=7.25)]), RecentQuarantine())
    write_batch(sink, Batch([]), RecentQuarantine())
    assert [w["received_since"] for w in sink.writes] == [7.25, 0.0]


def masked_row(message_id: str) -> MaskedLogin:
    return MaskedLogin(
        message_id=message_id,
        user_id="u",
        device_type="ios",
        masked_ip="ip",
        masked_device_id="dev",
        locale=None,
        app_version="1",
        create_date=date(2026, 1, 1),
    )


def test_a_receive_waiting_for_room_gives_up_once_stopping_without_any_release() -> None:
    """A receiver blocked on a full bound must see the stop by itself: nothing may ever release
    room again (the writer has stopped)."""
    full = BytesInHand(limit=10, per_receive=10)
    assert full.claim(lambda: False).take(None)
    stopping = threading.Event()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(full.claim(stopping.is_set).take(3)), daemon=True)
    gate = threading.Thread(target=lambda: got.append(full.wait_for_room(stopping.is_set)), daemon=True)
    waiter.start()
    gate.start()
    time.sleep(0.05)
    stopping.set()
    waiter.join(timeout=3)
    gate.join(timeout=3)
    assert got == [False, False] and full.held == 10


def test_a_receive_waiting_for_room_sees_the_stop_at_once() -> None:
    """GIVEN receives waiting for room (the bytes in hand at the bound), their own share or the
    gate before a sized receive
    WHEN the run stops (receivers stop at once: the last batch is cut when they have all ended)
    THEN each gives up within a few tenths of a second, with no release to wake it."""
    full = BytesInHand(limit=10, per_receive=10)
    assert full.claim(lambda: False).take(None)
    stopping = threading.Event()
    waiters = [
        threading.Thread(target=lambda: full.claim(stopping.is_set).take(3), daemon=True),
        threading.Thread(target=lambda: full.wait_for_room(stopping.is_set), daemon=True),
    ]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.05)  # both waiting
    stopping.set()
    started = time.monotonic()
    for waiter in waiters:
        waiter.join(timeout=3)
    assert time.monotonic() - started < 0.7
