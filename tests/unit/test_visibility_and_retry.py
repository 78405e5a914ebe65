"""The visibility keeper (point 4 of issue 11: each gap it had), the backoff policy (point 1), and
SqsReader's part in both (botocore stubbed: no network)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.stub import Stubber

from aws.sqs import SqsReader, SqsUnavailable
from aws.visibility import ExtendResult, VisibilityKeeper
from etl.retry import Abandoned, BudgetExhausted, Retrier, StopDeadlinePassed, StopState
from models import Backoff, ReceivedMessage
from tests.fakes import FakeClock


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def messages(count: int) -> list[ReceivedMessage]:
    return [ReceivedMessage(f"m{n}", f"r{n}", "{}") for n in range(count)]


class Extender:
    """Records calls; fails the calls whose numbers are in `fail`, refuses the messages whose ids are
    in `refuse` (returning their receipt handles)."""

    def __init__(
        self, fail: set[int] | None = None, refuse: set[str] | None = None, error: type[Exception] = SqsUnavailable
    ) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail or set()
        self.refuse = refuse or set()
        self.error = error

    def __call__(self, chunk: Sequence[ReceivedMessage], timeout: int) -> list[str]:
        self.calls.append([m.message_id for m in chunk])
        if len(self.calls) in self.fail:
            raise self.error("ChangeMessageVisibilityBatch failed")
        return [m.receipt_handle for m in chunk if m.message_id in self.refuse]  # as SqsReader does


def test_a_message_is_due_at_half_its_timeout() -> None:
    clock = Clock()
    keeper = VisibilityKeeper(Extender(), 30, clock=clock)
    keeper.track(messages(1))
    clock.now = 14.9
    assert keeper.due() == []
    clock.now = 15.1
    assert [m.message_id for m in keeper.due()] == ["m0"]


def test_after_a_failed_extension_the_next_tick_tries_again() -> None:
    """The deadline used to move before the call succeeded: the retry came when the message reappeared."""
    clock = Clock()
    extend = Extender(fail={1})
    keeper = VisibilityKeeper(extend, 30, clock=clock)
    keeper.track(messages(1))
    clock.now = 16
    assert keeper.extend_due().failed == 1
    clock.now = 17  # the next tick, long before the message reappears at 30
    assert keeper.extend_due().extended == 1
    clock.now = 30
    assert keeper.due() == []  # now extended from 17 to 47


def test_refused_entries_are_not_counted_as_extended_and_are_no_longer_tracked() -> None:
    clock = Clock()
    keeper = VisibilityKeeper(Extender(refuse={"m1"}), 30, clock=clock)
    keeper.track(messages(3))
    clock.now = 16
    result = keeper.extend_due()
    assert (result.extended, result.refused) == (2, 1)
    assert sorted(m.message_id for m in keeper.held()) == ["m0", "m2"]


def test_one_failing_call_does_not_skip_the_other_chunks() -> None:
    clock = Clock()
    extend = Extender(fail={1})
    keeper = VisibilityKeeper(extend, 30, clock=clock)
    keeper.track(messages(25))
    clock.now = 16
    result = keeper.extend_due()
    assert [len(call) for call in extend.calls] == [10, 10, 5]
    assert (result.extended, result.failed) == (15, 10)


def test_untracking_a_message_no_longer_tracked_does_nothing() -> None:
    """A refused extension drops a message; its delete's untrack comes later and must not raise
    (in a deleter thread it would end the thread). Mutation testing: `pop(handle)` survived."""
    keeper = VisibilityKeeper(Extender(), 30, clock=Clock())
    keeper.untrack(messages(2))
    assert len(keeper) == 0


def test_every_failing_call_of_a_pass_is_counted() -> None:
    """Mutation testing (docs/mutation.md): `failed = len(chunk)` instead of `+=` survived."""
    clock = Clock()
    keeper = VisibilityKeeper(Extender(fail={1, 3}), 30, clock=clock)
    keeper.track(messages(25))
    clock.now = 16
    assert keeper.extend_due() == ExtendResult(extended=10, refused=0, failed=15)


def test_the_extender_thread_reports_a_pass_that_only_refused_and_is_a_daemon() -> None:
    """Mutation testing: a pass with refusals alone went unreported, and a non-daemon extender
    thread (which would hold up the process's exit) survived."""
    clock = Clock()
    reported: list[ExtendResult] = []
    keeper = VisibilityKeeper(Extender(refuse={"m0"}), 1, clock=clock, on_pass=reported.append)
    keeper.track(messages(1))
    clock.now = 0.9  # due
    keeper.start()
    deadline = time.monotonic() + 5
    while not reported and time.monotonic() < deadline:
        time.sleep(0.01)
    keeper.stop()
    assert reported == [ExtendResult(refused=1)]
    assert keeper._thread is not None and keeper._thread.daemon and keeper._thread.name == "visibility"


def test_an_unexpected_error_does_not_end_the_extender_thread() -> None:
    clock = Clock()
    extend = Extender(fail={1}, error=RuntimeError)
    passes: list[int] = []
    keeper = VisibilityKeeper(extend, 1, clock=clock, on_pass=lambda result: passes.append(result.extended))
    keeper.track(messages(1))
    clock.now = 0.9  # due
    keeper.start()
    deadline = time.monotonic() + 5
    while 1 not in passes and time.monotonic() < deadline:
        time.sleep(0.01)
    keeper.stop()
    assert len(extend.calls) >= 2 and 1 in passes


# -- backoff and retries --------------------------------------------------------------------------


def test_the_backoff_ceiling_doubles_then_stays_at_the_cap_for_any_attempt() -> None:
    backoff = Backoff(0.2, 10.0)
    assert [backoff.ceiling(n) for n in (0, 1, 2, 3)] == [0.2, 0.4, 0.8, 1.6]
    for attempt in (6, 1_024, 10**6, 10**12):  # 2**1024 overflows a float
        assert backoff.ceiling(attempt) == 10.0
        assert 0 <= backoff.delay(attempt) <= 10.0


def test_full_jitter_draws_between_zero_and_the_ceiling() -> None:
    backoff = Backoff(1.0, 8.0)
    assert backoff.delay(2, rng=lambda: 0.0) == 0.0
    assert backoff.delay(2, rng=lambda: 0.5) == 2.0


@pytest.mark.parametrize(("base", "cap"), [(0, 1), (-1, 1), (2, 1)])
def test_a_nonsensical_backoff_is_refused(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        Backoff(base, cap)


def failing(times: float) -> tuple[list[int], object]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise SqsUnavailable("down")
        return "ok"

    return calls, call


def test_a_retrier_without_budget_retries_for_ever_with_no_real_sleeping() -> None:
    clock = FakeClock()
    errors: list[tuple[str, str]] = []
    retrier = Retrier(Backoff(), StopState(clock), budget_seconds=None, on_error=lambda *e: errors.append(e))
    calls, call = failing(50_000)
    assert retrier.call("SQS", "receive", call, SqsUnavailable) == "ok"  # type: ignore[arg-type]
    assert len(calls) == 50_001 and len(errors) == 50_000 and errors[0] == ("SQS", "receive")
    assert clock.slept > 50_000  # days of outage at the 10 s cap


def test_a_retrier_gives_up_after_its_budget() -> None:
    clock = FakeClock()
    retrier = Retrier(Backoff(), StopState(clock), budget_seconds=30)
    _, call = failing(float("inf"))
    with pytest.raises(BudgetExhausted, match="SQS delete failed for 30 s"):
        retrier.call("SQS", "delete", call, SqsUnavailable)  # type: ignore[arg-type]
    assert 30 <= clock.now() - 1000 < 41


def test_when_stopping_a_call_to_finish_is_retried_until_the_stop_deadline_only() -> None:
    clock = FakeClock()
    stop = StopState(clock, timeout_seconds=20)
    retrier = Retrier(Backoff(), stop, budget_seconds=None)
    stop.stop()
    _, call = failing(float("inf"))
    with pytest.raises(StopDeadlinePassed):
        retrier.call("PostgreSQL", "write", call, SqsUnavailable)  # type: ignore[arg-type]
    assert clock.now() - 1000 == pytest.approx(20)


def test_when_stopping_a_receive_is_abandoned_at_its_first_failure() -> None:
    stop = StopState(FakeClock())
    retrier = Retrier(Backoff(), stop, budget_seconds=None)
    stop.stop()
    calls, call = failing(float("inf"))
    with pytest.raises(Abandoned):
        retrier.call("SQS", "receive", call, SqsUnavailable, finish=False)  # type: ignore[arg-type]
    assert len(calls) == 1


def test_a_stop_wakes_a_retry_that_is_waiting() -> None:
    stop = StopState(timeout_seconds=0)
    retrier = Retrier(Backoff(5.0, 5.0), stop, budget_seconds=None, rng=lambda: 1.0)
    _, call = failing(float("inf"))
    threading.Timer(0.1, stop.stop).start()
    started = time.monotonic()
    with pytest.raises(StopDeadlinePassed):
        retrier.call("PostgreSQL", "write", call, SqsUnavailable)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2  # not the 5 s wait


def test_the_messages_closest_to_reappearing_are_extended_first() -> None:
    clock = Clock()
    keeper = VisibilityKeeper(Extender(), 30, clock=clock)
    first, second = messages(2)
    clock.now = 5
    keeper.track([first])  # tracked first, reappears at 35
    clock.now = 0
    keeper.track([second])  # tracked second, reappears at 30
    clock.now = 25
    assert [m.message_id for m in keeper.due()] == ["m1", "m0"]


# -- SqsReader under the keeper and the Retrier -------------------------------------------------------

QUEUE_URL = "http://localhost:4566/000000000000/login-queue"


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> SqsReader:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    return SqsReader(QUEUE_URL, endpoint_url="http://localhost:4566", transport="boto3")  # botocore stubbed


def test_a_refused_copy_of_a_message_does_not_untrack_its_other_copy(reader: SqsReader) -> None:
    """SQS delivered m0 twice; both copies are in one ChangeMessageVisibilityBatch call and SQS
    refuses the stale receipt only. Matched by message id, both copies stopped being tracked."""
    stale = ReceivedMessage("m0", "receipt-stale", "{}")
    latest = ReceivedMessage("m0", "receipt-latest", "{}", receive_count=2)
    clock = Clock()
    keeper = VisibilityKeeper(reader.change_visibility, 30, clock=clock)
    keeper.track([stale, latest])
    clock.now = 16
    with Stubber(reader.client) as stub:
        stub.add_response(
            "change_message_visibility_batch",
            {
                "Successful": [{"Id": "1"}],
                "Failed": [{"Id": "0", "Code": "ReceiptHandleIsInvalid", "SenderFault": True}],
            },
        )
        result = keeper.extend_due()
    assert (result.extended, result.refused) == (1, 1)
    assert [m.receipt_handle for m in keeper.held()] == ["receipt-latest"]


def test_botocore_does_not_retry_underneath_the_retrier(reader: SqsReader) -> None:
    """One attempt per call: a transient error reaches our Retrier at once (its backoff, budget and
    stop deadline decide), instead of botocore's own retries running first (max_attempts=3 was
    four attempts: botocore's max_attempts counts retries)."""
    sent: list[str] = []

    class Body:
        def stream(self, **_kwargs: object) -> Iterator[bytes]:
            yield b'{"__type": "InternalError", "message": "fake"}'

    def answer_500(request: AWSPreparedRequest, **_kwargs: object) -> AWSResponse:
        sent.append(request.url)  # in place of the network: botocore's retries still apply
        return AWSResponse(request.url, 500, {"Content-Type": "application/x-amz-json-1.0"}, Body())

    reader.client.meta.events.register("before-send.sqs.ReceiveMessage", answer_500)
    with pytest.raises(SqsUnavailable, match="InternalError"):
        reader.receive()
    assert len(sent) == 1
