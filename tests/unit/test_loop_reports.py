"""What the consume loop reports about itself: the observer's events (the metrics' inputs), the
commit's log line and its structured fields, the counters of the visibility extender, and the
details of `Stopped` that the caller acts on; and the bounds of its back-pressure and its threads.
Over fakes; no network, no timed assertions."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from etl.batch import Batch
from etl.observability import JsonFormatter, Observer
from etl.pipeline import Pipeline, Stopped
from models import MaskedLogin, ReceivedMessage, Rejection, WriteResult
from tests.fakes import (
    MASKER,
    FailingSink,
    FakeClock,
    FakeQueue,
    FakeSink,
    MemoryQueue,
    WriteWaits,
    bodies,
    body,
    options,
    run_in_thread,
    wait_until,
)

WRITE_SECONDS = 0.01  # each write of SlowSink takes at least this long


class SlowSink(FakeSink):
    """A sink whose every write takes at least WRITE_SECONDS (a commit with a measurable duration)."""

    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        time.sleep(WRITE_SECONDS)
        return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)


class StaggeredSink(SlowSink):
    """A SlowSink whose writes take a quarter of a millisecond more each, modulo one: the commits'
    durations fall on different fractions of a millisecond, so a field rounded to whole
    milliseconds cannot pass for one rounded to a tenth (sleeps overshoot by a steady few tens of
    microseconds; four staggered writes cannot all land that close to a whole millisecond)."""

    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        time.sleep(0.00025 * (self.commits % 4))
        return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)


class RecordingObserver(Observer):
    """Keeps every commit event: (batch, seconds, written)."""

    def __init__(self) -> None:
        self.commits: list[tuple[Batch, float, WriteResult]] = []

    def on_commit(self, batch: Batch, seconds: float, written: WriteResult) -> None:
        self.commits.append((batch, seconds, written))


def test_each_commit_tells_the_observer_its_batch_its_write_time_and_what_it_wrote() -> None:
    """GIVEN 40 good messages and a bad one, committed in batches of 10
    WHEN the queue is drained with an observer (the metrics are one)
    THEN every commit reports its batch, a write time within the run, and the rows it wrote, and
    those add up to the run's counters and to what the sink holds."""
    sink = SlowSink()
    queue = FakeQueue([*bodies(40), ("bad", "not json")], stored=sink.holds)
    observer = RecordingObserver()
    started = time.monotonic()
    stats = Pipeline(queue, sink, MASKER, options(receivers=1, batch_size=10), observer=observer).run()
    elapsed = time.monotonic() - started

    assert observer.commits and len(observer.commits) == sink.commits
    ids = sorted(m.message_id for batch, _, _ in observer.commits for m in batch.messages)
    assert ids == sorted([*(f"m{n:05d}" for n in range(40)), "bad"]) and stats.received == 41
    assert all(WRITE_SECONDS <= seconds <= elapsed for _, seconds, _ in observer.commits)
    assert sum(written.inserted for _, _, written in observer.commits) == stats.loaded == len(sink.logins) == 40
    assert sum(written.rejected for _, _, written in observer.commits) == stats.rejected == 1
    assert {r for _, _, written in observer.commits for r in written.rejected_ids} == {"bad"}


def test_each_commit_logs_its_batch_size_and_duration_as_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    """GIVEN the debug log (`-v`) in JSON
    WHEN batches are committed
    THEN each commit's line formats, and carries `batch_size` (the batch's messages) and
    `duration_ms` (the same write time the metrics get, in milliseconds)."""
    sink = StaggeredSink()
    observer = RecordingObserver()
    queue = FakeQueue(bodies(40), stored=sink.holds)
    with caplog.at_level(logging.DEBUG, logger="etl.pipeline"):
        Pipeline(queue, sink, MASKER, options(receivers=1, batch_size=10), observer=observer).run()

    records = [r for r in caplog.records if r.name == "etl.pipeline" and r.levelno == logging.DEBUG]
    assert len(records) == len(observer.commits) == sink.commits >= 4
    for record, (batch, seconds, _) in zip(records, observer.commits, strict=True):
        line = json.loads(JsonFormatter().format(record))  # formats the message: it must not raise
        assert line["batch_size"] == len(batch.messages)
        assert line["duration_ms"] == pytest.approx(seconds * 1000, abs=0.05)


def test_the_counters_count_every_extension_the_queue_accepted() -> None:
    """GIVEN messages in hand while the write waits (a slow database)
    WHEN they near the end of their visibility timeout and the extender extends them
    THEN `extended` (in the run's summary) counts the extensions SQS accepted."""
    clock = FakeClock()
    accepted: list[int] = []
    entered, release = threading.Event(), threading.Event()

    class CountingQueue(FakeQueue):
        def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
            refused = super().change_visibility(messages, timeout_seconds)
            accepted.append(len(messages) - len(refused))
            return refused

    sink = WriteWaits(entered, release, wait_seconds=10)
    queue = CountingQueue(bodies(20), stored=sink.holds, clock=clock)
    pipeline = Pipeline(queue, sink, MASKER, options(receivers=1, batch_size=20, flush_seconds=0), clock=clock)
    thread, outcome = run_in_thread(pipeline)
    try:
        assert entered.wait(10)
        wait_until(lambda: len(pipeline.keeper) == 20)
        clock.advance(20)  # 10 s of a 30 s timeout left: due
        wait_until(lambda: sum(accepted) >= 20)
        wait_until(lambda: pipeline.stats.extended == sum(accepted))
    finally:
        release.set()
        thread.join(10)
    [stats] = outcome
    assert not isinstance(stats, Exception), stats
    assert pipeline.stats.extended == sum(accepted) >= 20


def test_a_stop_that_gives_up_retrying_a_database_outage_says_no_call_is_in_flight() -> None:
    """GIVEN PostgreSQL unreachable, every write failing at once
    WHEN a stop's timeout passes while the write is retried
    THEN Stopped names PostgreSQL and says no call hung: the caller may close the writer's
    connection (cli/run.py)."""
    clock = FakeClock()
    sink = FailingSink(failures=float("inf"))
    queue = FakeQueue(bodies(30), stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options(follow=True, stop_timeout_seconds=20), clock=clock)
    thread, outcome = run_in_thread(pipeline)
    wait_until(lambda: sink.attempts > 3)
    pipeline.stop()
    thread.join(10)
    [error] = outcome
    assert isinstance(error, Stopped) and not error.hung
    assert error.uncommitted == pipeline.stats.received > 0
    assert "PostgreSQL" in str(error)  # the service that was down


@pytest.mark.parametrize(("stuck_in", "uncommitted"), [("on_writer_turn", 30), ("on_commit", 20)])
def test_a_writer_stuck_outside_postgresql_is_stopped_without_blaming_postgresql(
    stuck_in: str, uncommitted: int
) -> None:
    """GIVEN the writer's thread stuck outside any PostgreSQL call: in its first turn (before any
    commit), or in the report of a first commit of 10 (with 20 more received meanwhile)
    WHEN the run is stopped and its time limit passes
    THEN Stopped counts exactly the messages received and not committed, and says no PostgreSQL
    call hung (the writer's connection may be closed)."""
    all_received, stuck, release = threading.Event(), threading.Event(), threading.Event()

    class StuckObserver(Observer):
        def on_writer_turn(self) -> None:
            if stuck_in == "on_writer_turn":
                self.stick()

        def on_commit(self, batch: Batch, seconds: float, written: WriteResult) -> None:
            if stuck_in == "on_commit":
                self.stick()

        def stick(self) -> None:
            stuck.set()
            release.wait(30)

    class FirstWriteWaits(FakeSink):
        def write(self, logins, rejections, *, redelivered=False, received_since=0.0):
            all_received.wait(10)  # the first commit ends with 20 messages received after its batch
            return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)

    sink = FirstWriteWaits()
    queue = FakeQueue(bodies(30), stored=sink.holds)
    pipeline = Pipeline(
        queue,
        sink,
        MASKER,
        options(follow=True, receivers=1, batch_size=10, stop_timeout_seconds=0.2),
        observer=StuckObserver(),
        stop_margin_seconds=0.2,
    )
    try:
        thread, outcome = run_in_thread(pipeline)
        wait_until(lambda: len(pipeline.keeper) == 30)  # tracked after counting them in hand
        all_received.set()
        assert stuck.wait(10)
        pipeline.stop()
        thread.join(10)
        assert not thread.is_alive()
        [error] = outcome
        assert isinstance(error, Stopped) and not error.hung
        assert error.uncommitted == pipeline.stats.received - len(sink.logins) == uncommitted
        assert "PostgreSQL" not in str(error)
    finally:
        release.set()


def test_every_thread_of_a_run_is_a_daemon_also_when_run_from_a_thread_that_is_not() -> None:
    """GIVEN a run started from a thread that is not a daemon (as main.py's main thread)
    WHEN its receivers, writer, deleters and extender are running
    THEN each of them is a daemon: a call that hangs is abandoned on its thread at the stop's time
    limit, and must not then hold up the process's exit (the pipeline's docstring)."""
    before = set(threading.enumerate())
    seen: list[set[threading.Thread]] = []

    class Snapshot(Observer):
        def on_commit(self, batch: Batch, seconds: float, written: WriteResult) -> None:
            if not seen:
                seen.append(set(threading.enumerate()))
                pipeline.stop()

    sink = FakeSink()
    queue = FakeQueue(bodies(30), stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options(follow=True, receivers=2), observer=Snapshot())
    outcome: list[object] = []
    caller = threading.Thread(target=lambda: outcome.append(pipeline.run()), daemon=False)
    caller.start()
    caller.join(30)
    assert not caller.is_alive() and outcome, "run() did not end"
    started = seen[0] - before - {caller}
    assert len(started) >= 2 + 1 + 2 + 1, started  # 2 receivers, the writer, 2 deleters, the extender
    assert [t.name for t in started if not t.daemon] == []


def test_each_failed_write_is_reported_as_a_postgres_error_and_retried_after_the_configured_backoff() -> None:
    """GIVEN PostgreSQL failing the first 6 writes, --backoff-base-seconds 0.5, --backoff-cap-seconds 4
    and every jitter draw at its top
    WHEN the queue is drained
    THEN the observer (the errors_total metric) hears of each failure as service "postgres", kind
    "write", and the waits between attempts are 1, 2, 4 s, then the cap."""
    errors: list[tuple[str, str]] = []

    class ErrorObserver(Observer):
        def on_error(self, service: str, kind: str) -> None:
            errors.append((service, kind))

    class SleepRecorder(FakeClock):
        def __init__(self) -> None:
            super().__init__()
            self.sleeps: list[float] = []

        def sleep(self, seconds: float, wake: threading.Event) -> None:
            self.sleeps.append(seconds)
            super().sleep(seconds, wake)

    clock = SleepRecorder()
    sink = FailingSink(failures=6)
    queue = FakeQueue(bodies(20), stored=sink.holds)
    backoff = options(receivers=1, backoff_base_seconds=0.5, backoff_cap_seconds=4)
    stats = Pipeline(queue, sink, MASKER, backoff, observer=ErrorObserver(), clock=clock, rng=lambda: 1.0).run()
    assert stats.loaded == len(sink.logins) == 20
    assert errors == [("postgres", "write")] * 6
    assert clock.sleeps == [1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def stays(condition: Callable[[], bool], seconds: float = 0.3) -> bool:
    """`condition()` held at each look for `seconds` (a bound that holds: what must not happen
    did not happen meanwhile; never a measure of speed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize(("batch_size", "batch", "inbox"), [(50, 50, 100), (51, 60, 100)])
def test_while_the_writer_is_behind_the_receivers_hold_two_batches_besides_the_one_being_written(
    batch_size: int, batch: int, inbox: int
) -> None:
    """GIVEN a write that does not return (the database is behind), receives of 10 messages
    WHEN the receivers go on receiving
    THEN they hold two batches (2 * batch_size // 10 receives) in the inbox besides the batch being
    written, and one more receive waiting to be put there: back-pressure (docs/architecture.md)."""
    messages = [ReceivedMessage(f"m{n:05d}", f"r{n}", body(n), 1_700_000_000_000, 1) for n in range(400)]
    sink = WriteWaits()
    pipeline = Pipeline(
        MemoryQueue(messages), sink, MASKER, options(receivers=1, batch_size=batch_size, flush_seconds=3600)
    )
    runner, outcome = run_in_thread(pipeline)
    try:
        held = batch + inbox + 10
        wait_until(lambda: pipeline.stats.received >= held)
        assert stays(lambda: pipeline.stats.received == held), pipeline.stats.received
    finally:
        sink.release.set()
        runner.join(10)
    assert len(sink.logins) == 400 and not isinstance(outcome[0], Exception)


@pytest.mark.parametrize(("batch_size", "commits"), [(10, 3), (12, 2)])
def test_with_deletes_not_returning_the_writer_waits_once_two_batches_of_delete_calls_are_outstanding(
    batch_size: int, commits: int
) -> None:
    """GIVEN DeleteMessageBatch calls that do not return, batches of 10 messages (1 call each) or
    of 20 (batch size 12: 2 calls each; two batches of 12 are 2 calls)
    WHEN the writer goes on committing
    THEN it commits while at most two batches of delete calls are outstanding (queued or running),
    and waits at the next batch's first delete: memory stays bounded (docs/architecture.md)."""
    release = threading.Event()

    class DeletesWait(FakeQueue):
        def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
            release.wait(30)
            return super().delete(messages)

    sink = FakeSink()
    queue = DeletesWait(bodies(60), stored=sink.holds)
    pipeline = Pipeline(
        queue, sink, MASKER, options(receivers=1, deleters=2, batch_size=batch_size, flush_seconds=3600)
    )
    runner, outcome = run_in_thread(pipeline)
    try:
        wait_until(lambda: sink.commits >= commits)
        assert stays(lambda: sink.commits == commits), sink.commits
    finally:
        release.set()
        runner.join(10)
    assert len(sink.logins) == 60 and queue.left == 0 and not isinstance(outcome[0], Exception)


def test_a_write_that_never_returns_is_named_in_the_stop_error_with_the_time_limit_that_passed() -> None:
    """GIVEN a write that neither returns nor fails (a half-open connection)
    WHEN the run is stopped and its time limit (stop timeout 0.3 s + margin 0.2 s) passes
    THEN the error (the line printed at exit 5) says a PostgreSQL call had not returned 0.5 s after
    the stop: which service to look at, and how long it was given."""
    entered, release = threading.Event(), threading.Event()

    sink = WriteWaits(entered, release)
    pipeline = Pipeline(
        FakeQueue(bodies(30), stored=sink.holds),
        sink,
        MASKER,
        options(follow=True, receivers=1, stop_timeout_seconds=0.3),
        stop_margin_seconds=0.2,
    )
    try:
        thread, outcome = run_in_thread(pipeline)
        assert entered.wait(10)
        pipeline.stop()
        thread.join(10)
        [error] = outcome
        assert isinstance(error, Stopped) and error.hung
        assert "PostgreSQL" in str(error) and "0.5 s after the stop" in str(error)
    finally:
        release.set()


def test_an_extension_call_that_never_returns_does_not_hold_up_the_end_of_the_run() -> None:
    """GIVEN a ChangeMessageVisibilityBatch call that neither returns nor fails
    WHEN the queue is drained (committed and deleted) meanwhile
    THEN run() ends, abandoning the call on the extender's thread: it waits for that thread no
    longer than the stop's time limit (the pipeline's docstring)."""
    clock = FakeClock()
    extending, release = threading.Event(), threading.Event()

    class HangingExtensions(FakeQueue):
        def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
            extending.set()
            release.wait(30)
            return super().change_visibility(messages, timeout_seconds)

    class WritesAfterTheExtension(FakeSink):
        def write(self, logins, rejections, *, redelivered=False, received_since=0.0):
            extending.wait(10)
            return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)

    sink = WritesAfterTheExtension()
    queue = HangingExtensions(bodies(20), stored=sink.holds, clock=clock)
    pipeline = Pipeline(
        queue,
        sink,
        MASKER,
        options(receivers=1, batch_size=20, flush_seconds=0, stop_timeout_seconds=0.3),
        clock=clock,
        stop_margin_seconds=0.2,
    )
    try:
        thread, outcome = run_in_thread(pipeline)
        wait_until(lambda: len(pipeline.keeper) == 20)
        clock.advance(20)  # 10 s of a 30 s timeout left: due
        assert extending.wait(10)
        thread.join(10)
        assert not thread.is_alive(), "run() waits for an extension call that never returns"
        [stats] = outcome
        assert not isinstance(stats, Exception), stats
        assert len(sink.logins) == 20 and queue.left == 0
    finally:
        release.set()


def test_a_receive_failing_when_the_run_stops_is_abandoned_and_each_failure_is_an_sqs_receive_error() -> None:
    """GIVEN SQS failing every receive (an outage), --follow
    WHEN the run is stopped
    THEN the receiver gives up at its next failure (a receive is not finished like a commit): the
    run ends with its counters, nothing uncommitted; each failure was reported as service "sqs",
    kind "receive" (the errors_total metric)."""
    clock = FakeClock()
    errors: list[tuple[str, str]] = []

    class ErrorObserver(Observer):
        def on_error(self, service: str, kind: str) -> None:
            errors.append((service, kind))

    class Unreachable(MemoryQueue):
        def receive(self) -> list[ReceivedMessage]:
            from aws.sqs import SqsUnavailable

            raise SqsUnavailable("ReceiveMessage failed: fake outage")

    pipeline = Pipeline(
        Unreachable([]), FakeSink(), MASKER, options(follow=True), observer=ErrorObserver(), clock=clock
    )
    thread, outcome = run_in_thread(pipeline)
    wait_until(lambda: len(errors) >= 3)
    pipeline.stop()
    thread.join(10)
    assert not thread.is_alive()
    [stats] = outcome
    assert not isinstance(stats, Exception), stats
    assert set(errors) == {("sqs", "receive")} and pipeline.stats.received == 0


@pytest.mark.parametrize("sized", [False, True], ids=["worst-case-share", "answer-size-share"])
def test_a_receiver_waiting_for_room_in_hand_stops_at_once_when_the_run_is_stopped(sized: bool) -> None:
    """GIVEN a bound on bytes in hand that the first receive fills, its batch in a write that waits,
    and the receiver waiting for room (a source that knows its answer's size, or one that does not)
    WHEN the run is stopped
    THEN the receiver ends at once, before any room is made ("receivers stop at once"), and nothing
    is received after the stop."""
    entered, release = threading.Event(), threading.Event()

    sink = WriteWaits(entered, release)
    if sized:
        source: MemoryQueue | FakeQueue = FakeQueue(bodies(30), stored=sink.holds)
    else:
        source = MemoryQueue([ReceivedMessage(f"m{n}", f"r{n}", body(n), 1_700_000_000_000, 1) for n in range(30)])
    before = set(threading.enumerate())
    pipeline = Pipeline(
        source,
        sink,
        MASKER,
        options(follow=True, receivers=1, batch_size=10, max_bytes_in_hand=1000, max_message_bytes=100),
    )
    thread, outcome = run_in_thread(pipeline)
    try:
        assert entered.wait(10)
        started = set(threading.enumerate()) - before - {thread}
        assert pipeline.in_hand.held >= 1000  # the receiver waits for room
        pipeline.stop()
        # the receiver's end, with no room made: every thread of the run but one is still alive
        wait_until(lambda: sum(t.is_alive() for t in started) == len(started) - 1)
    finally:
        release.set()
        thread.join(10)
    [stats] = outcome
    assert not isinstance(stats, Exception), stats
    assert pipeline.stats.received == len(sink.logins) == 10


def test_redelivered_messages_are_counted_once_each_in_the_counters_and_for_the_observer() -> None:
    """GIVEN messages received for the first, second and third time
    WHEN the queue is drained
    THEN `redelivered` (and the observer's count, the redelivered_total metric) counts each message
    received more than once (ApproximateReceiveCount > 1), once."""
    heard: list[tuple[int, int]] = []

    class ReceivedObserver(Observer):
        def on_received(self, count: int, redelivered: int) -> None:
            heard.append((count, redelivered))

    messages = [
        ReceivedMessage(f"m{n}", f"r{n}", body(n), 1_700_000_000_000, receive_count=1 + n % 3) for n in range(30)
    ]
    stats = Pipeline(MemoryQueue(messages), FakeSink(), MASKER, options(), observer=ReceivedObserver()).run()
    assert stats.received == sum(count for count, _ in heard) == 30
    assert stats.redelivered == sum(redelivered for _, redelivered in heard) == 20


def test_a_body_over_max_body_bytes_is_quarantined_unparsed_as_too_large() -> None:
    """GIVEN --max-body-bytes 300 and one body of 400 bytes among small ones
    WHEN the queue is drained
    THEN that message is quarantined as too large, the others loaded (the size policy)."""
    sink = FakeSink()
    large = body(99, app_version="9" * 300)
    queue = FakeQueue([*bodies(5), ("large", large)], stored=sink.holds)
    stats = Pipeline(queue, sink, MASKER, options(max_body_bytes=300)).run()
    assert len(large.encode()) > 300 >= max(len(b.encode()) for _, b in bodies(5))
    assert sink.rejections["large"].kind == "body_too_large" and len(sink.logins) == 5
    assert (stats.loaded, stats.rejected) == (5, 1)


def test_a_queue_refused_for_good_at_a_receive_ends_the_run_with_queue_lost() -> None:
    """GIVEN the queue deleted (or access denied) after a first receive
    WHEN the next receive is refused for good
    THEN the run ends with QueueLost (its exit code), not with its counters as after a drain; nothing
    uncommitted was deleted."""
    from aws.sqs import QueueUnusable
    from etl.pipeline import QueueLost

    class DeletedQueue(FakeQueue):
        receives = 0

        def receive(self, consumer: str = "") -> list[ReceivedMessage]:
            self.receives += 1
            if self.receives > 1:
                raise QueueUnusable("ReceiveMessage failed: AWS.SimpleQueueService.NonExistentQueue")
            return super().receive(consumer)

    sink = FakeSink()
    queue = DeletedQueue(bodies(30), stored=sink.holds)
    pipeline = Pipeline(queue, sink, MASKER, options(receivers=1, batch_size=10))
    with pytest.raises(QueueLost, match="NonExistentQueue"):
        pipeline.run()
    assert pipeline.stats.received == 10 and queue.early_deletes == []


def test_a_write_hung_when_the_queue_is_refused_for_good_names_both_in_the_stop_error() -> None:
    """GIVEN a write that never returns, and then the next receive refused for good (queue deleted)
    WHEN the run's time limit passes
    THEN the Stopped error names the hung PostgreSQL call and, after it, the failure that ended the
    run: both are what the operator has to look at."""
    from aws.sqs import QueueUnusable

    entered, release = threading.Event(), threading.Event()

    class DeletedAfterTheFirstReceive(FakeQueue):
        receives = 0

        def receive(self, consumer: str = "") -> list[ReceivedMessage]:
            self.receives += 1
            if self.receives > 1:
                entered.wait(10)  # the writer is inside the write
                raise QueueUnusable("ReceiveMessage failed: AWS.SimpleQueueService.NonExistentQueue")
            return super().receive(consumer)

    sink = WriteWaits(entered, release)
    pipeline = Pipeline(
        DeletedAfterTheFirstReceive(bodies(30), stored=sink.holds),
        sink,
        MASKER,
        options(follow=True, receivers=1, batch_size=10, stop_timeout_seconds=0.3),
        stop_margin_seconds=0.2,
    )
    try:
        thread, outcome = run_in_thread(pipeline)
        thread.join(10)
        assert not thread.is_alive()
        [error] = outcome
        assert isinstance(error, Stopped) and error.hung and error.uncommitted == 10
        assert "PostgreSQL" in str(error) and "NonExistentQueue" in str(error)
    finally:
        release.set()
