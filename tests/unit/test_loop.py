"""The consume loop over fakes: ordering, batching, poison, retries, stopping. No network, no sleeping
through backoffs (a FakeClock), seconds in all."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from cli.exit_codes import EXIT_QUEUE_LOST
from database.errors import DatabaseUnavailable
from etl.pipeline import Pipeline, QueueLost, ServiceLost, Stopped
from models import MaskedLogin, ReceivedMessage, Rejection
from pii.masking import Masker
from tests.fakes import (
    MASKER,
    FailingSink,
    FakeClock,
    FakeQueue,
    FakeSink,
    Faults,
    FirstCallFails,
    MemoryQueue,
    WriteWaits,
    bodies,
    body,
    options,
    run_in_thread,
    wait_until,
)


class PoisonMasker(Masker):
    """Raises for device ids starting with 'poison' (a bug that trips on some messages)."""

    def mask(self, field: str, value: str) -> str:
        if value.startswith("poison"):
            raise RuntimeError("boom")
        return super().mask(field, value)


# -- ordering and batching -----------------------------------------------------------------------


def test_every_message_is_stored_once_and_deleted_only_after_its_commit() -> None:
    sink = FakeSink()
    queue = FakeQueue(bodies(500), stored=sink.holds)
    stats = Pipeline(queue, sink, MASKER, options()).run()
    assert queue.early_deletes == []
    assert len(sink.logins) == 500 and queue.left == 0
    assert (stats.received, stats.loaded, stats.rejected) == (500, 500, 0)


def test_a_drain_ends_at_the_first_empty_receive() -> None:
    queue = FakeQueue(bodies(25))
    Pipeline(queue, FakeSink(), MASKER, options()).run()  # returns: it would hang otherwise
    assert queue.left == 0


def test_a_full_batch_is_committed_without_waiting_for_its_age() -> None:
    sink = FakeSink()
    pipeline = Pipeline(
        FakeQueue(bodies(30)), sink, MASKER, options(follow=True, receivers=1, batch_size=10, flush_seconds=3600)
    )
    thread, _ = run_in_thread(pipeline)
    wait_until(lambda: len(sink.logins) == 30)
    assert sink.commits == 3
    pipeline.stop()
    thread.join(10)


def test_a_partial_batch_is_committed_once_its_oldest_message_is_flush_seconds_old() -> None:
    sink = FakeSink()
    pipeline = Pipeline(FakeQueue(bodies(5)), sink, MASKER, options(follow=True, batch_size=1000, flush_seconds=0.05))
    thread, _ = run_in_thread(pipeline)
    wait_until(lambda: len(sink.logins) == 5, timeout=5)
    pipeline.stop()
    thread.join(10)
    assert sink.commits == 1


def test_counters_equal_what_the_sink_stored() -> None:
    sink = FakeSink()
    queue = FakeQueue([*bodies(40), ("bad1", "not json"), ("bad2", "{}")], stored=sink.holds)
    day = queue.as_received("m00003").create_date  # the row's key is (message_id, create_date)
    sink.tables.add_login(MaskedLogin("m00003", "u", "ios", "x", "y", None, "1", day))
    stats = Pipeline(queue, sink, MASKER, options()).run()
    assert (stats.loaded, stats.rejected, stats.duplicates) == (39, 2, 1)
    assert len(sink.logins) == 40 and len(sink.rejections) == 2


# -- poison messages ----------------------------------------------------------------------------


def test_a_message_whose_processing_fails_is_left_for_redelivery_below_max_receives() -> None:
    sink = FakeSink()
    queue = FakeQueue([*bodies(3), ("p", body(9, device_id="poison-1"))], stored=sink.holds)
    pipeline = Pipeline(queue, sink, PoisonMasker(bytes(64)), options(max_receives=3))
    stats = pipeline.run()
    assert "p" not in sink.logins and "p" not in sink.rejections and "p" not in queue.deleted
    assert stats.failed == 1 and len(pipeline.keeper) == 0  # not extended: it comes back


def test_a_message_that_keeps_failing_is_quarantined_at_max_receives() -> None:
    sink = FakeSink()
    queue = FakeQueue([("p", body(9, device_id="poison-1"))], stored=sink.holds)
    for _ in range(3):
        Pipeline(queue, sink, PoisonMasker(bytes(64)), options(max_receives=3)).run()
        queue.expire_all()
    assert sink.rejections["p"].reason == "processing failed 3 times: RuntimeError"
    assert queue.left == 0


def test_a_message_received_twice_in_one_batch_with_one_copy_failing_is_deleted_and_not_left_in_hand() -> None:
    """Point 5: one copy transformed, the other raised: stored, both receipts deleted, none held."""
    message = ReceivedMessage("dup", "r1", body(1), 1_700_000_000_000, 1)
    again = ReceivedMessage("dup", "r2", body(1), 1_700_000_000_000, 2)

    class Source(MemoryQueue):
        def __init__(self) -> None:
            super().__init__([message, again])
            self.deleted_receipts: list[str] = []

        def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
            self.deleted_receipts.extend(m.receipt_handle for m in messages)
            return []

    source = Source()
    sink = FakeSink()
    pipeline = Pipeline(source, sink, FirstCallFails(bytes(64)), options(receivers=1))
    stats = pipeline.run()
    assert "dup" in sink.logins
    assert sorted(source.deleted_receipts) == ["r1", "r2"]
    assert len(pipeline.keeper) == 0 and stats.failed == 0


# -- rows PostgreSQL refuses ----------------------------------------------------------------------


def test_a_login_the_database_refuses_is_quarantined_alone() -> None:
    sink = FakeSink(refuse_logins={"m00002"})
    queue = FakeQueue(bodies(5), stored=sink.holds)
    stats = Pipeline(queue, sink, MASKER, options()).run()
    assert sorted(sink.logins) == ["m00000", "m00001", "m00003", "m00004"]
    assert sink.rejections["m00002"].reason.startswith("refused by PostgreSQL")
    assert (stats.loaded, stats.rejected) == (4, 1) and queue.left == 0


def test_a_quarantine_row_the_database_refuses_is_replaced_by_a_minimal_one() -> None:
    sink = FakeSink(refuse_rejections={"bad"})
    queue = FakeQueue([*bodies(3), ("bad", "not json")], stored=sink.holds)
    Pipeline(queue, sink, MASKER, options()).run()
    assert "bad" in sink.rejections and sink.rejections["bad"].reason.startswith("quarantine row refused")
    assert len(sink.logins) == 3 and queue.left == 0


def test_a_message_neither_table_accepts_is_left_for_redelivery_and_the_rest_is_stored() -> None:
    sink = FakeSink(refuse_rejections={"bad"}, refuse_minimal=True)
    queue = FakeQueue([*bodies(3), ("bad", "not json")], stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options())
    stats = pipeline.run()
    assert "bad" not in sink.rejections and "bad" not in queue.deleted and len(sink.logins) == 3
    assert stats.failed == 1 and len(pipeline.keeper) == 0


# -- retries, outages and stopping ---------------------------------------------------------------


def test_drain_mode_gives_up_after_the_retry_budget_without_deleting_anything() -> None:
    clock = FakeClock()
    sink = FailingSink(failures=float("inf"))
    queue = FakeQueue(bodies(20), stored=sink.holds)
    with pytest.raises(ServiceLost, match="PostgreSQL write failed for 60 s"):
        Pipeline(queue, sink, MASKER, options(retry_budget_seconds=60), clock=clock).run()
    assert queue.deleted == set() and 60 <= clock.now() - 1000 < 75


def test_follow_mode_survives_100_000_consecutive_failures_and_then_stores_everything() -> None:
    """Point 1: 2**attempt overflowed a float at about the 1,024th attempt and killed --follow."""
    clock = FakeClock()
    sink = FailingSink(failures=100_000)
    queue = FakeQueue(bodies(20), stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options(follow=True), clock=clock)
    thread, outcome = run_in_thread(pipeline)
    wait_until(lambda: len(sink.logins) == 20, timeout=120)
    pipeline.stop()
    thread.join(10)
    assert sink.attempts > 100_000 and clock.now() - 1000 > 100_000  # days of (fake) outage
    assert outcome and not isinstance(outcome[0], Exception), outcome
    assert queue.early_deletes == [] and queue.left == 0


def test_stop_finishes_the_batch_in_hand() -> None:
    release = threading.Event()

    class SlowSink(FakeSink):
        def write(self, logins, rejections, *, redelivered=False, received_since=0.0):
            release.wait(10)
            return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)

    sink = SlowSink()
    queue = FakeQueue(bodies(30), stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options(follow=True, receivers=1, batch_size=1000, flush_seconds=0))
    thread, outcome = run_in_thread(pipeline)
    wait_until(lambda: pipeline.stats.received > 0)
    pipeline.stop()
    release.set()
    thread.join(10)
    stats = outcome[0]
    assert not isinstance(stats, Exception), stats
    received = pipeline.stats.received
    assert len(sink.logins) == received and len(queue.deleted) == received and len(pipeline.keeper) == 0


def test_stop_during_a_database_outage_gives_up_at_the_stop_timeout_and_deletes_nothing() -> None:
    """Point 2: the write retry ignored stop, so a stop during an outage never exited."""
    clock = FakeClock()
    sink = FailingSink(failures=float("inf"))
    queue = FakeQueue(bodies(30), stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options(follow=True, stop_timeout_seconds=20), clock=clock)
    thread, outcome = run_in_thread(pipeline)
    wait_until(lambda: sink.attempts > 3)
    stopped_at = clock.now()
    pipeline.stop()
    thread.join(10)
    assert not thread.is_alive()
    [error] = outcome
    assert isinstance(error, Stopped) and error.uncommitted == pipeline.stats.received > 0
    assert queue.deleted == set() and clock.now() - stopped_at <= 20 + 1e-6


def test_stop_while_deletes_fail_abandons_them_at_the_stop_timeout() -> None:
    clock = FakeClock()
    sink = FakeSink()

    class NoDeletes(FakeQueue):
        def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
            from aws.sqs import SqsUnavailable

            raise SqsUnavailable("DeleteMessageBatch failed: fake outage")

    queue = NoDeletes(bodies(30), stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options(follow=True, stop_timeout_seconds=5), clock=clock)
    thread, outcome = run_in_thread(pipeline)
    wait_until(lambda: len(sink.logins) == 30)
    pipeline.stop()
    thread.join(10)
    assert not thread.is_alive() and not isinstance(outcome[0], Exception)
    assert pipeline.stats.delete_failures == 30 and len(pipeline.keeper) == 0


def test_a_delete_refused_for_good_ends_the_run_with_queue_lost_and_keeps_what_was_committed() -> None:
    """DeleteMessage denied (or the queue deleted) after a commit: running on would receive the same
    messages again and again, so even --follow ends, with QueueLost (its exit code); the rows
    committed stay, nothing was deleted, and what was committed is no longer kept in hand."""
    sink = FakeSink()
    queue = FakeQueue(bodies(30), Faults(delete_permanent=1.0), stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options(follow=True, receivers=1, batch_size=10))
    thread, outcome = run_in_thread(pipeline)
    thread.join(10)
    assert not thread.is_alive(), "a delete refused for good did not end the run"
    [error] = outcome
    assert isinstance(error, QueueLost) and "DeleteMessageBatch failed: AccessDenied" in str(error)
    assert exit_of(error)[0] == EXIT_QUEUE_LOST
    assert queue.permanent_failures >= 1 and queue.deleted == set()
    committed = pipeline.stats.loaded
    assert committed >= 10 and len(sink.logins) == committed and sink.stored_twice == []
    assert {m.message_id for m in pipeline.keeper.held()}.isdisjoint(sink.logins)


class OneAtATime(MemoryQueue):
    """Serves one message per receive."""

    def receive(self) -> list[ReceivedMessage]:
        with self._lock:
            batch, self._messages = self._messages[:1], self._messages[1:]
            return batch


def _twice_delivered() -> list[ReceivedMessage]:
    """One message delivered twice: the copy of receive 2 (the poison rule's), then that of receive 1."""
    return [
        ReceivedMessage("dup", "r2", body(1), 1_700_000_000_000, 2),
        ReceivedMessage("dup", "r1", body(1), 1_700_000_000_000, 1),
    ]


def test_a_first_delivery_arriving_after_its_quarantined_copy_is_not_also_loaded() -> None:
    """SQS delivered a message twice; the poison rule quarantined one copy (receive 2), then the
    other copy (receive 1, no redelivery flag of its own) transformed fine in a later batch."""

    sink = FakeSink()
    Pipeline(
        OneAtATime(_twice_delivered()),
        sink,
        FirstCallFails(bytes(64)),
        options(receivers=1, batch_size=1, max_receives=2),
    ).run()
    assert "dup" in sink.rejections and sink.stored_twice == [] and "dup" not in sink.logins


def test_a_quarantine_whose_commit_reported_a_failure_still_guards_a_later_first_delivery() -> None:
    """As above, but the commit of the quarantine row succeeded and reported a failure (the
    connection lost after COMMIT): its retry stores nothing new, so the loop never hears the id
    was quarantined, and the other copy must still not be loaded beside it (simulation seed 1684)."""

    class FirstCommitReportsFailure(FakeSink):
        def write(
            self,
            logins: Sequence[MaskedLogin],
            rejections: Sequence[Rejection],
            *,
            redelivered: bool = False,
            received_since: float = 0.0,
        ):
            written = super().write(logins, rejections, redelivered=redelivered, received_since=received_since)
            if self.commits == 1:
                self.connected = False
                raise DatabaseUnavailable("connection lost after COMMIT was sent")
            return written

    sink = FirstCommitReportsFailure()
    Pipeline(
        OneAtATime(_twice_delivered()),
        sink,
        FirstCallFails(bytes(64)),
        options(receivers=1, batch_size=1, max_receives=2, backoff_base_seconds=0.001, backoff_cap_seconds=0.001),
    ).run()
    assert "dup" in sink.rejections and sink.stored_twice == [] and "dup" not in sink.logins


# -- a call that hangs: the stop timeout is a hard bound ---------------------------------------------

STOP_TIMEOUT = 0.5
MARGIN = 0.5


def exit_of(error: Exception) -> tuple[int, str]:
    """The exit code and the one `error:` line main() makes of an error (its ERRORS table)."""
    from cli.exit_codes import ERRORS

    code, template = next((code, template) for kind, code, template in ERRORS if isinstance(error, kind))
    return code, template.format(exc=error, dsn="PostgreSQL", queue="q", stop_timeout=f"{STOP_TIMEOUT:g}")


def test_stop_while_a_write_never_returns_ends_within_the_stop_timeout_and_exits_5_deleting_nothing() -> None:
    """A half-open connection: the commit neither fails nor returns, so no retry ever sees the stop
    deadline. run() used to wait for the writer thread for ever (then SIGKILL after the grace)."""
    entered, release = threading.Event(), threading.Event()

    sink = WriteWaits(entered, release, wait_seconds=None)
    queue = FakeQueue(bodies(30), stored=sink.holds)
    pipeline = Pipeline(
        queue,
        sink,
        MASKER,
        options(follow=True, receivers=1, stop_timeout_seconds=STOP_TIMEOUT),
        stop_margin_seconds=MARGIN,
    )
    try:
        thread, outcome = run_in_thread(pipeline)
        assert entered.wait(10)
        stopped_at = time.monotonic()
        pipeline.stop()
        thread.join(STOP_TIMEOUT + MARGIN + 5)
        ended_after = time.monotonic() - stopped_at
        assert not thread.is_alive(), "run() still waits for a write that never returns"
        [error] = outcome
        assert isinstance(error, Stopped) and error.hung
        assert error.uncommitted == pipeline.stats.received > 0 and queue.deleted == set()
        assert STOP_TIMEOUT + MARGIN - 0.05 <= ended_after < STOP_TIMEOUT + MARGIN + 2  # the bound, not a speed
        code, line = exit_of(error)
        assert code == 5 and f"{pipeline.stats.received} messages left uncommitted" in line
    finally:
        release.set()  # let the abandoned thread end


def test_stop_while_a_delete_never_returns_abandons_it_within_the_stop_timeout_and_exits_0() -> None:
    """The batch is committed; a DeleteMessageBatch call hangs. The deleters used to be waited for
    (ThreadPoolExecutor.shutdown(wait=True)), for ever."""
    entered, release = threading.Event(), threading.Event()

    class HangingDeletes(FakeQueue):
        def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
            entered.set()
            release.wait()
            return super().delete(messages)

    sink = FakeSink()
    queue = HangingDeletes(bodies(30), stored=sink.holds)
    pipeline = Pipeline(
        queue,
        sink,
        MASKER,
        options(follow=True, stop_timeout_seconds=STOP_TIMEOUT, batch_size=1000, flush_seconds=0),
        stop_margin_seconds=MARGIN,
    )
    try:
        thread, outcome = run_in_thread(pipeline)
        wait_until(lambda: len(sink.logins) == 30 and entered.is_set())
        stopped_at = time.monotonic()
        pipeline.stop()
        thread.join(STOP_TIMEOUT + MARGIN + 5)
        ended_after = time.monotonic() - stopped_at
        assert not thread.is_alive(), "run() still waits for a delete that never returns"
        [stats] = outcome
        assert not isinstance(stats, Exception), stats  # everything was committed: exit 0
        assert pipeline.stats.delete_failures == 30 and len(pipeline.keeper) == 0 and queue.deleted == set()
        assert ended_after < STOP_TIMEOUT + MARGIN + 2  # the bound, not a speed
    finally:
        release.set()
