"""The retrier's and the visibility keeper's smaller promises, each found missing by mutation testing
(docs/mutation.md): what a retry logs and when, how long it waits, what its errors name; which
passes the extender thread reports, how long its stop waits, how often it looks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import pytest

from aws.sqs import SqsUnavailable
from aws.visibility import Extend, ExtendResult, VisibilityKeeper
from etl.retry import Abandoned, Clock, Retrier, StopDeadlinePassed, StopState
from models import Backoff, ReceivedMessage
from tests.fakes import FakeClock


def messages(count: int) -> list[ReceivedMessage]:
    return [ReceivedMessage(f"m{n}", f"r{n}", "{}") for n in range(count)]


class Counter:
    """A call that fails `times` times with SqsUnavailable("down"), then returns "ok"."""

    def __init__(self, times: float) -> None:
        self.times = times
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.times:
            raise SqsUnavailable("down")
        return "ok"


class SleepRecorder(FakeClock):
    def __init__(self) -> None:
        super().__init__()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds, wake)


# -- retry ----------------------------------------------------------------------------------------


def test_the_nth_wait_is_drawn_under_the_backoff_ceiling_of_the_nth_failure() -> None:
    """Backoff: attempt n waits uniform(0, min(cap, base * 2**n)); with the draw at its top, the
    waits after failures 1, 2, 3 are 2, 4, 8 times the base. The rng given to the Retrier is the one
    used."""
    clock = SleepRecorder()
    retrier = Retrier(Backoff(1.0, 100.0), StopState(clock), budget_seconds=None, rng=lambda: 1.0)
    assert retrier.call("SQS", "receive", Counter(3), SqsUnavailable) == "ok"
    assert clock.sleeps == [2.0, 4.0, 8.0]


def test_a_retry_logs_the_first_failure_then_every_tenth(caplog: pytest.LogCaptureFixture) -> None:
    """LOG_EVERY: a long outage must not flood the log, and must still show up in it."""
    retrier = Retrier(Backoff(), StopState(FakeClock()), budget_seconds=None)
    with caplog.at_level(logging.WARNING, logger="etl.retry"):
        retrier.call("SQS", "receive", Counter(25), SqsUnavailable)
    records = [r for r in caplog.records if r.name == "etl.retry"]
    assert [getattr(r, "attempt", None) for r in records] == [1, 10, 20]


def test_a_retry_warning_names_the_call_and_the_error_in_text_and_json_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """docs/operations.md: a JSON log line carries `attempt`, `service`, `error` where they apply."""
    retrier = Retrier(Backoff(), StopState(FakeClock()), budget_seconds=None)
    with caplog.at_level(logging.WARNING, logger="etl.retry"):
        retrier.call("SQS", "receive", Counter(1), SqsUnavailable)
    (record,) = [r for r in caplog.records if r.name == "etl.retry"]
    assert "SQS receive" in record.getMessage() and "down" in record.getMessage()
    assert (record.attempt, record.service, record.error) == (1, "SQS", "down")  # type: ignore[attr-defined]


def test_the_errors_of_a_stopping_retrier_name_service_and_operation() -> None:
    """RetryError: "The text names service and operation." """
    stop = StopState(FakeClock(), timeout_seconds=1)
    retrier = Retrier(Backoff(), stop, budget_seconds=None)
    stop.stop()
    with pytest.raises(Abandoned, match="SQS receive"):
        retrier.call("SQS", "receive", Counter(float("inf")), SqsUnavailable, finish=False)
    with pytest.raises(StopDeadlinePassed, match="PostgreSQL write"):
        retrier.call("PostgreSQL", "write", Counter(float("inf")), SqsUnavailable)


def test_a_retry_while_stopping_never_waits_past_the_stop_deadline() -> None:
    """Half a second left before the stop deadline, a 5 s backoff: the wait is the half second,
    then the call gives up at the deadline, not after it."""
    clock = SleepRecorder()
    stop = StopState(clock, timeout_seconds=0.5)
    retrier = Retrier(Backoff(5.0, 5.0), stop, budget_seconds=None, rng=lambda: 1.0)
    stop.stop()
    with pytest.raises(StopDeadlinePassed):
        retrier.call("PostgreSQL", "write", Counter(float("inf")), SqsUnavailable)
    assert clock.sleeps == [0.5]
    assert clock.now() == pytest.approx(1000.5)


def test_while_stopping_a_retry_still_waits_its_backoff_instead_of_spinning() -> None:
    """Once stopping, the stop event stays set: a wait woken by it would return at once and the
    call would be hammered until the stop deadline. Real clock: 0.3 s at 0.1 s a wait."""
    stop = StopState(Clock(), timeout_seconds=0.3)
    retrier = Retrier(Backoff(0.1, 0.1), stop, budget_seconds=None, rng=lambda: 1.0)
    stop.stop()
    call = Counter(float("inf"))
    with pytest.raises(StopDeadlinePassed):
        retrier.call("PostgreSQL", "write", call, SqsUnavailable)
    assert 2 <= call.calls <= 10


# -- visibility -------------------------------------------------------------------------------------


class Clockwork:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def failing_extend(error: Exception) -> Extend:
    def extend(chunk: Sequence[ReceivedMessage], timeout: int) -> list[str]:
        raise error

    return extend


@pytest.mark.parametrize(
    ("error", "shown"),
    [
        (
            SqsUnavailable("ChangeMessageVisibilityBatch failed\nsecond line"),
            "SqsUnavailable: ChangeMessageVisibilityBatch failed",
        ),
        (TimeoutError(), "TimeoutError"),
    ],
)
def test_a_failed_extension_is_logged_with_the_errors_type_and_first_line_only(
    caplog: pytest.LogCaptureFixture, error: Exception, shown: str
) -> None:
    clock = Clockwork()
    keeper = VisibilityKeeper(failing_extend(error), 30, clock=clock)
    keeper.track(messages(2))
    clock.now = 16
    with caplog.at_level(logging.WARNING, logger="aws.visibility"):
        assert keeper.extend_due() == ExtendResult(failed=2)
    (record,) = [r for r in caplog.records if r.name == "aws.visibility"]
    assert record.getMessage().endswith(f": {shown}")
    assert "second line" not in record.getMessage()


def test_a_message_deleted_during_the_call_does_not_stop_the_others_being_extended() -> None:
    """A deleter untracks a message while its extension is in flight: that one is skipped, the
    rest of the chunk still gets its new deadline."""
    clock = Clockwork()
    keeper: VisibilityKeeper

    def extend(chunk: Sequence[ReceivedMessage], timeout: int) -> list[str]:
        keeper.untrack(chunk[:1])
        return []

    keeper = VisibilityKeeper(extend, 30, clock=clock)
    keeper.track(messages(3))
    clock.now = 16
    assert keeper.extend_due() == ExtendResult(extended=2)
    assert sorted(m.message_id for m in keeper.held()) == ["m1", "m2"]
    clock.now = 30
    assert keeper.due() == []  # both extended from 16 to 46


def test_every_refusal_of_a_call_is_counted() -> None:
    clock = Clockwork()

    def extend(chunk: Sequence[ReceivedMessage], timeout: int) -> list[str]:
        return [m.receipt_handle for m in chunk if m.message_id != "m1"]

    keeper = VisibilityKeeper(extend, 30, clock=clock)
    keeper.track(messages(3))
    clock.now = 16
    assert keeper.extend_due() == ExtendResult(extended=1, refused=2)


def test_the_extender_thread_reports_a_pass_that_only_failed() -> None:
    """A pass whose every call failed is the one an operator most needs to see (on_pass feeds the
    metrics)."""
    clock = Clockwork()
    reported: list[ExtendResult] = []
    keeper = VisibilityKeeper(failing_extend(SqsUnavailable("down")), 1, clock=clock, on_pass=reported.append)
    keeper.track(messages(1))
    clock.now = 0.9  # due
    keeper.start()
    deadline = time.monotonic() + 5
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    keeper.stop()
    assert reported and reported[0] == ExtendResult(failed=1)


def test_stopping_a_keeper_never_started_does_nothing() -> None:
    VisibilityKeeper(lambda chunk, timeout: [], 30).stop()


def test_stop_waits_for_the_extender_thread_but_no_longer_than_it_is_told() -> None:
    """stop() joins the thread (it has ended when stop returns); an extension call that hangs holds
    stop() up for `wait_seconds` only."""
    keeper = VisibilityKeeper(lambda chunk, timeout: [], 1)
    keeper.start()
    keeper.stop()
    assert keeper._thread is not None and not keeper._thread.is_alive()

    entered, release = threading.Event(), threading.Event()

    def hang(chunk: Sequence[ReceivedMessage], timeout: int) -> list[str]:
        entered.set()
        release.wait(10)
        return []

    clock = Clockwork()
    hanging = VisibilityKeeper(hang, 1, clock=clock)
    hanging.track(messages(1))
    clock.now = 0.9  # due
    hanging.start()
    assert entered.wait(5)
    started = time.monotonic()
    hanging.stop(wait_seconds=0.2)
    took = time.monotonic() - started
    release.set()
    assert took < 2


class RecordingDone(threading.Event):
    """The keeper's stop event: records each wait's timeout (the tick) and ends the loop after one."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return len(self.waits) > 1


@pytest.mark.parametrize("timeout", [1, 2, 30, 43_200])
def test_the_extender_looks_at_least_four_times_per_timeout(timeout: int) -> None:
    """A message is due at half its timeout; with a pass every quarter timeout (or oftener) there is
    one in the second half even when one is late, so a short timeout is not outrun by the tick."""
    keeper = VisibilityKeeper(lambda chunk, timeout: [], timeout)
    done = RecordingDone()
    keeper._done = done
    keeper._loop()
    tick = done.waits[0]
    assert tick is not None and 0 < tick <= timeout / 4


def test_a_pass_logs_how_many_messages_it_extended_and_how_many_sqs_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Logs carry counts (never bodies): an operator sees a slow batch being kept hidden, and stale
    receipts being dropped."""
    clock = Clockwork()

    def extend(chunk: Sequence[ReceivedMessage], timeout: int) -> list[str]:
        return [m.receipt_handle for m in chunk if m.message_id == "m0"]

    keeper = VisibilityKeeper(extend, 30, clock=clock)
    keeper.track(messages(3))
    clock.now = 16
    with caplog.at_level(logging.INFO, logger="aws.visibility"):
        keeper.extend_due()
    lines = [r.getMessage() for r in caplog.records if r.name == "aws.visibility"]
    assert any("refused" in line and "1 of 3" in line for line in lines)
    assert any("extended" in line and " 2 " in line for line in lines)


def test_a_failed_pass_of_the_extender_thread_is_logged_with_its_traceback_and_what_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ "No error ends the extender thread"; the error is still shown, saying whose pass failed."""
    clock = Clockwork()
    passes: list[ExtendResult] = []

    def on_pass(result: ExtendResult) -> None:
        passes.append(result)
        raise RuntimeError("a bug in the metrics")

    keeper = VisibilityKeeper(failing_extend(SqsUnavailable("down")), 1, clock=clock, on_pass=on_pass)
    keeper.track(messages(1))
    clock.now = 0.9  # due at every pass: each extension fails
    with caplog.at_level(logging.ERROR, logger="aws.visibility"):
        keeper.start()
        deadline = time.monotonic() + 5
        while len(passes) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        keeper.stop()
    assert len(passes) >= 2  # the thread went on
    records = [r for r in caplog.records if r.name == "aws.visibility" and r.levelno == logging.ERROR]
    assert records and records[0].exc_info is not None
    assert "visibility extender" in records[0].getMessage()
