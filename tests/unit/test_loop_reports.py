"""What the consume loop reports about itself: the observer's events (the metrics' inputs), the
commit's log line and its structured fields, the counters of the visibility extender, and the
details of `Stopped` that the caller acts on. Over fakes; no network, no timed assertions."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence

import pytest

from etl.batch import Batch
from etl.observability import JsonFormatter, Observer
from etl.pipeline import Pipeline, Stopped
from models import MaskedLogin, ReceivedMessage, Rejection, WriteResult
from tests.fakes import MASKER, FailingSink, FakeClock, FakeQueue, FakeSink, bodies, options, run_in_thread, wait_until

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
    sink = SlowSink()
    observer = RecordingObserver()
    queue = FakeQueue(bodies(30), stored=sink.holds)
    with caplog.at_level(logging.DEBUG, logger="etl.pipeline"):
        Pipeline(queue, sink, MASKER, options(receivers=1, batch_size=10), observer=observer).run()

    records = [r for r in caplog.records if r.name == "etl.pipeline" and r.levelno == logging.DEBUG]
    assert len(records) == len(observer.commits) == sink.commits > 0
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

    class WaitingSink(FakeSink):
        def write(self, logins, rejections, *, redelivered=False, received_since=0.0):
            entered.set()
            release.wait(10)
            return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)

    sink = WaitingSink()
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
    THEN Stopped says no call hung: the caller may close the writer's connection (cli/run.py)."""
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


def test_a_writer_stuck_outside_postgresql_is_stopped_without_blaming_postgresql() -> None:
    """GIVEN a first batch committed, its report to the observer never returning (the writer's
    thread is stuck after the commit, not in a PostgreSQL call), and two more batches received
    WHEN the run is stopped and its time limit passes
    THEN Stopped counts exactly the messages received and not committed, and says no PostgreSQL
    call hung (the writer's connection may be closed)."""
    all_received, stuck, release = threading.Event(), threading.Event(), threading.Event()

    class StuckObserver(Observer):
        def on_commit(self, batch: Batch, seconds: float, written: WriteResult) -> None:
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
        assert error.uncommitted == pipeline.stats.received - len(sink.logins) == 20
        assert "PostgreSQL" not in str(error)
    finally:
        release.set()
