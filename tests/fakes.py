"""Shared by unit and integration tests: sample login bodies, and in-memory stand-ins for the
consume loop's seams (a queue with SQS's semantics, a sink with PostgresWriter's, a clock that never
sleeps, fault plans for the simulation test).

They implement pipeline.MessageSource and pipeline.BatchSink, so the real Pipeline runs over them.
The queue and its clock live in tests/fake_queue.py, the tables and the writer's sessions in
tests/fake_sink.py (imported from here). `MemoryQueue` (the simplest source: no redelivery, deletes
counted) also serves bench/ (the sink scenario).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from config import PipelineOptions
from database.errors import DatabaseUnavailable
from models import MaskedLogin, ReceivedMessage, Rejection, WriteResult
from pii.masking import Masker
from tests.fake_queue import MAX_MESSAGES_PER_RECEIVE, FakeClock, FakeQueue, Faults, QueueClient, spread_timestamps
from tests.fake_sink import FakeSink, FakeTables

if TYPE_CHECKING:
    from hypothesis.internal.charmap import CategoryName

__all__ = ["FakeClock", "FakeQueue", "FakeSink", "FakeTables", "Faults", "QueueClient", "spread_timestamps"]

# Every Unicode category but Cs: surrogates cannot be encoded to UTF-8, so no JSON body holds one.
NOT_SURROGATES: tuple[CategoryName, ...] = ("L", "M", "N", "P", "S", "Z", "Cc", "Cf", "Co", "Cn")

GOOD_LOGIN = {
    "user_id": "424cdd21-063a-43a7-b91b-7ca1a833afae",
    "app_version": "2.3.0",
    "device_type": "android",
    "ip": "199.172.111.135",
    "locale": "RU",
    "device_id": "593-47-5928",
}


def login(n: int, **changes: object) -> str:
    """A good body whose ip and device_id are unique to n."""
    data = {
        **GOOD_LOGIN,
        "user_id": f"user-{n}",
        "ip": f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}",
        "device_id": f"{100 + n % 900}-{n // 900 % 90 + 10}-{n % 9000 + 1000}",
        **changes,
    }
    return json.dumps(data)


class MemoryQueue:
    """Serves the given messages ten at a time, once each; deletes only count."""

    def __init__(self, messages: Sequence[ReceivedMessage]) -> None:
        self._messages = list(messages)
        self._next = 0
        self._lock = threading.Lock()
        self.deleted = 0

    def receive(self) -> list[ReceivedMessage]:
        now = time.monotonic()
        with self._lock:
            start = self._next
            self._next = min(len(self._messages), start + MAX_MESSAGES_PER_RECEIVE)
            received = self._messages[start : self._next]
        for message in received:
            message.received_at = now
        return received

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        with self._lock:
            self.deleted += len(messages)
        return []

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        return []


class Room:
    """A models.ReceiveRoom that records what it was asked for, and grants it or not."""

    worst_case = 10 * 262_144

    def __init__(self, grant: bool) -> None:
        self.grant = grant
        self.asked: list[int | None] = []

    def take(self, nbytes: int | None) -> bool:
        self.asked.append(nbytes)
        return self.grant


def run_in_thread(pipeline: Any) -> tuple[threading.Thread, list[object]]:
    """Start `pipeline.run()` on a daemon thread; the list receives its Stats or the exception it raised."""
    outcome: list[object] = []

    def target() -> None:
        try:
            outcome.append(pipeline.run())
        except Exception as exc:  # noqa: BLE001 - handed to the test, which judges it
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


class FirstCallFails(Masker):
    """A masker whose first mask() call raises (a transient bug), then works."""

    def __init__(self, key: bytes) -> None:
        super().__init__(key)
        self.calls = 0

    def mask(self, field: str, value: str) -> str:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("transient bug")
        return super().mask(field, value)


# -- the consume loop's unit tests (tests/unit/test_loop.py, test_health.py) ----------------------

MASKER = Masker(bytes(64))


def body(n: int, **changes: object) -> str:
    return json.dumps(
        {
            "user_id": f"user-{n}",
            "device_type": "ios",
            "ip": f"10.0.{n // 256}.{n % 256}",
            "device_id": f"dev-{n}",
            "app_version": "2.3.0",
            "locale": None,
            **changes,
        }
    )


def bodies(count: int) -> list[tuple[str, str]]:
    return [(f"m{n:05d}", body(n)) for n in range(count)]


def options(**changes: object) -> PipelineOptions:
    defaults: dict[str, object] = {"receivers": 2, "deleters": 2, "batch_size": 50, "flush_seconds": 0.01}
    return PipelineOptions(**{**defaults, **changes})  # type: ignore[arg-type]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class WriteWaits(FakeSink):
    """A sink whose writes wait until `release` is set, at most `wait_seconds` (None: for ever): a
    database that is behind, or a call that neither returns nor fails (a half-open connection).
    `entered` is set as each write begins; both events may be the test's own."""

    def __init__(
        self,
        entered: threading.Event | None = None,
        release: threading.Event | None = None,
        *,
        wait_seconds: float | None = 30.0,
    ) -> None:
        super().__init__()
        self.entered = entered or threading.Event()
        self.release = release or threading.Event()
        self.wait_seconds = wait_seconds

    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        self.entered.set()
        self.release.wait(self.wait_seconds)
        return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)


class FailingSink(FakeSink):
    """A sink whose writes fail (DatabaseUnavailable) the first `failures` times."""

    def __init__(self, failures: float) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise DatabaseUnavailable("connection refused (fake)")
        return super().write(logins, rejections, redelivered=redelivered, received_since=received_since)
