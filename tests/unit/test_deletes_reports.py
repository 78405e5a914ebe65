"""What the Deleters tell the operator: the warning of a delete that failed (how many, and why), the
warning of deletes abandoned at the stop's time limit (which call, how many), and a late end of an
abandoned call that raises nothing on the deleter's thread. No network, no timed assertions."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence

import pytest

from etl.deletes import Deleters
from etl.observability import Stats
from etl.retry import Retrier, StopState
from models import Backoff, ReceivedMessage
from tests.fakes import FakeClock


def deleters(delete: Callable[[Sequence[ReceivedMessage]], Sequence[str]], stats: Stats) -> Deleters:
    """One deleter thread over `delete`, retried for 5 s of a clock that never really sleeps."""
    retrier = Retrier(Backoff(1, 1), StopState(FakeClock()), budget_seconds=5)
    return Deleters(
        delete, retrier, untrack=lambda chunk: None, stats=stats, fail=lambda exc: None, threads=1, max_calls=4
    )


def chunk(name: str, size: int) -> list[ReceivedMessage]:
    return [ReceivedMessage(f"{name}{i}", f"r-{name}{i}", "{}") for i in range(size)]


def never() -> bool:
    return False


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "etl.deletes" and r.levelno == logging.WARNING]


def test_a_delete_that_fails_is_logged_with_how_many_messages_and_the_error(caplog: pytest.LogCaptureFixture) -> None:
    """GIVEN a delete call that raises (a bug, not an outage)
    WHEN a chunk of 3 committed messages is deleted
    THEN a warning says how many were not deleted and why (the error's text)."""

    def delete(messages: Sequence[ReceivedMessage]) -> list[str]:
        raise RuntimeError("a bug in the delete path")

    made = deleters(delete, Stats())
    made.start()
    with caplog.at_level(logging.WARNING, logger="etl.deletes"):
        made.submit(chunk("a", 3), never)
        assert made.close(time.monotonic() + 5) == 0
    [line] = warnings(caplog)
    assert re.search(r"\b3\b", line) and "a bug in the delete path" in line


def test_deletes_abandoned_at_the_time_limit_are_logged_naming_the_call_and_how_many(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GIVEN a DeleteMessageBatch call that does not return
    WHEN the deleters are closed and the time limit passes
    THEN a warning names the call that had not returned (DeleteMessageBatch) and how many committed
    messages were abandoned."""
    entered, release = threading.Event(), threading.Event()

    def delete(messages: Sequence[ReceivedMessage]) -> list[str]:
        entered.set()
        release.wait(10)
        return []

    made = deleters(delete, Stats())
    made.start()
    try:
        made.submit(chunk("a", 7), never)
        assert entered.wait(5)
        with caplog.at_level(logging.WARNING, logger="etl.deletes"):
            assert made.close(time.monotonic() + 0.1) == 7
    finally:
        release.set()
    [line] = warnings(caplog)
    assert re.search(r"\b7\b", line) and "DeleteMessageBatch" in line


def test_the_late_end_of_an_abandoned_call_raises_nothing_on_the_deleter_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GIVEN a delete call abandoned at close's time limit
    WHEN it returns after all
    THEN its end is ignored: no second report, and no exception escapes the deleter's thread."""
    escaped: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()

    def delete(messages: Sequence[ReceivedMessage]) -> list[str]:
        entered.set()
        release.wait(10)
        returned.set()
        return []

    stats = Stats()
    made = deleters(delete, stats)
    before = set(threading.enumerate())
    made.start()
    [thread] = set(threading.enumerate()) - before
    made.submit(chunk("a", 2), never)
    assert entered.wait(5)
    assert made.close(time.monotonic() + 0.1) == 2
    release.set()
    assert returned.wait(5)
    thread.join(5)
    assert not thread.is_alive() and escaped == [] and stats.delete_failures == 2
