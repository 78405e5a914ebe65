"""Shared by unit and integration tests: sample login bodies, and in-memory stand-ins for the
consume loop's seams (a queue with SQS's semantics, a sink with PostgresWriter's, a clock that never
sleeps, fault plans for the simulation test).

They implement pipeline.MessageSource and pipeline.BatchSink, so the real Pipeline runs over them.
`MemoryQueue` (the simplest source: no redelivery, deletes counted) also serves bench/ (the sink
scenario).
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aws.sqs import QueueUnusable, SqsUnavailable
from config import PipelineOptions
from database.sqs_postgres import DatabaseRejectedRows, DatabaseUnavailable, SchemaBusy
from models import MaskedLogin, ReceivedMessage, Rejection, WriteResult
from pii.masking import Masker
from retry import Clock

if TYPE_CHECKING:
    from hypothesis.internal.charmap import CategoryName

MAX_MESSAGES_PER_RECEIVE = 10
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
        with self._lock:
            start = self._next
            self._next = min(len(self._messages), start + MAX_MESSAGES_PER_RECEIVE)
            return self._messages[start : self._next]

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        with self._lock:
            self.deleted += len(messages)
        return []

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        return []


class FakeClock(Clock):
    """Monotonic time that moves only when someone sleeps: 100,000 backoffs take no real time."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._lock = threading.Lock()
        self.slept = 0.0

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        with self._lock:
            self._now += max(0.0, seconds)
            self.slept += max(0.0, seconds)


@dataclass
class Faults:
    """Probabilities of each fault per call (0 = never). Seeded: a run's faults replay from its seed."""

    seed: int = 0
    receive_error: float = 0.0  # SqsUnavailable from ReceiveMessage
    receive_permanent: float = 0.0  # QueueUnusable from ReceiveMessage (the queue deleted mid-run)
    duplicate: float = 0.0  # a message in flight delivered again (SQS is at-least-once)
    lapse: float = 0.0  # every message in flight reappears (its visibility timeout passed)
    delete_error: float = 0.0  # SqsUnavailable, the deletes not applied
    delete_error_after: float = 0.0  # SqsUnavailable, the deletes applied (the answer was lost)
    delete_refused: float = 0.0  # an entry refused (counted in Failed)
    delete_permanent: float = 0.0  # QueueUnusable from DeleteMessageBatch (DeleteMessage denied)
    extend_error: float = 0.0
    write_error: float = 0.0  # DatabaseUnavailable, nothing committed
    write_error_after_commit: float = 0.0  # committed, but the client saw the connection break
    write_permanent: float = 0.0  # the database gone for good: this and every later connect and write fail
    connect_error: float = 0.0  # DatabaseUnavailable or SchemaBusy from connect()
    slow: float = 0.0  # a call takes a little real time
    # Stop: `on_stop()` is called at the start of the `stop_at_call`-th call to a fake (0: the
    # first), whichever thread makes it; None: never. Calls, not seconds: a stop lands anywhere in
    # a run, and a seed replays it at the same point (thread interleavings aside).
    stop_at_call: int | None = None
    on_stop: Callable[[], None] = lambda: None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.calls = 0
        self.broken = False  # a permanent fault was injected

    def tick(self) -> None:
        """Count one call to a fake; stop the run when its call comes."""
        with self._lock:
            due = self.calls == self.stop_at_call
            self.calls += 1
        if due:
            self.on_stop()

    def hit(self, probability: float) -> bool:
        if probability <= 0:
            return False
        with self._lock:
            return self._rng.random() < probability

    def maybe_slow(self) -> None:
        if self.hit(self.slow):
            time.sleep(0.001)


class FakeQueue:
    """A standard SQS queue: visible and in-flight messages, receipt handles, receive counts.

    Deleting with a receipt handle that is not the message's latest succeeds and does nothing, as
    SQS documents. `stored` tells whether the sink holds a message: deleting one it does not hold
    is recorded in `early_deletes` (the invariant "no delete before its commit").
    """

    def __init__(
        self,
        bodies: Sequence[tuple[str, str]],
        faults: Faults | None = None,
        stored: Callable[[str], bool] | None = None,
    ) -> None:
        self.bodies = dict(bodies)
        self.faults = faults or Faults()
        self.stored = stored or (lambda message_id: True)
        self._visible = [message_id for message_id, _ in bodies]
        self._latest: dict[str, str] = {}  # in flight: message id -> latest receipt handle
        self._receives: Counter[str] = Counter()
        self._receipts = itertools.count(1)
        self._lock = threading.Lock()
        self.deleted: set[str] = set()
        self.early_deletes: list[str] = []
        self.permanent_failures = 0
        self.empty_wait_seconds = 0.002

    def receive(self) -> list[ReceivedMessage]:
        self.faults.tick()
        self.faults.maybe_slow()
        if self.faults.hit(self.faults.receive_error):
            raise SqsUnavailable("ReceiveMessage failed: fake outage")
        if self.faults.hit(self.faults.receive_permanent):
            self.permanent_failures += 1
            self.faults.broken = True
            raise QueueUnusable("ReceiveMessage failed: AWS.SimpleQueueService.NonExistentQueue (fake)")
        with self._lock:
            if self.faults.hit(self.faults.lapse):
                self._visible.extend(self._latest)
                self._latest.clear()
            taken = self._visible[:MAX_MESSAGES_PER_RECEIVE]
            del self._visible[: len(taken)]
            if self._latest and self.faults.hit(self.faults.duplicate):
                taken.append(next(iter(self._latest)))  # delivered again while still in flight
            delivered = [self._deliver(message_id) for message_id in taken]
        if not delivered:
            time.sleep(self.empty_wait_seconds)  # a long poll that found nothing
        return delivered

    def _deliver(self, message_id: str) -> ReceivedMessage:
        receipt = f"{message_id}#{next(self._receipts)}"
        self._latest[message_id] = receipt
        self._receives[message_id] += 1
        return ReceivedMessage(
            message_id=message_id,
            receipt_handle=receipt,
            body=self.bodies[message_id],
            sent_timestamp_ms=1_700_000_000_000,
            receive_count=self._receives[message_id],
        )

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        self.faults.tick()
        self.faults.maybe_slow()
        if self.faults.hit(self.faults.delete_error):
            raise SqsUnavailable("DeleteMessageBatch failed: fake outage")
        if self.faults.hit(self.faults.delete_permanent):
            self.permanent_failures += 1
            self.faults.broken = True
            raise QueueUnusable("DeleteMessageBatch failed: AccessDenied (fake)")
        refused: list[str] = []
        with self._lock:
            for message in messages:
                if not self.stored(message.message_id):
                    self.early_deletes.append(message.message_id)
                if self.faults.hit(self.faults.delete_refused):
                    refused.append(message.message_id)
                    continue
                if self._latest.get(message.message_id) == message.receipt_handle:
                    del self._latest[message.message_id]
                    self.deleted.add(message.message_id)
        if self.faults.hit(self.faults.delete_error_after):
            raise SqsUnavailable("DeleteMessageBatch failed: fake outage after the deletes")
        return refused

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        """Like SqsReader: the receipt handles refused (stale: not the message's latest)."""
        self.faults.tick()
        if self.faults.hit(self.faults.extend_error):
            raise SqsUnavailable("ChangeMessageVisibilityBatch failed: fake outage")
        with self._lock:
            return [m.receipt_handle for m in messages if self._latest.get(m.message_id) != m.receipt_handle]

    def expire_all(self) -> None:
        """Every message in flight becomes visible again (its visibility timeout passed)."""
        with self._lock:
            self._visible.extend(self._latest)
            self._latest.clear()

    @property
    def visible(self) -> int:
        with self._lock:
            return len(self._visible)

    @property
    def left(self) -> int:
        """Messages not deleted (visible or in flight)."""
        with self._lock:
            return len(self._visible) + len(self._latest)


class FakeSink:
    """PostgresWriter's contract in memory: one atomic write per batch, idempotent on message id,
    a message in one table only, rows it refuses alone (`refuse_logins`, `refuse_rejections`).

    It keeps what a check of the counters needs: `offered`, the rows of every committed write; and
    `ambiguous`, what the commits that reported a failure (the connection lost after COMMIT) stored
    and were offered, which the loop cannot have counted."""

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        refuse_logins: set[str] | None = None,
        refuse_rejections: set[str] | None = None,
        refuse_minimal: bool = False,
    ) -> None:
        self.faults = faults or Faults()
        self.refuse_logins = refuse_logins or set()
        self.refuse_rejections = refuse_rejections or set()
        self.refuse_minimal = refuse_minimal  # also the minimal quarantine row (no sent_at) of those ids
        self.logins: dict[str, MaskedLogin] = {}
        self.rejections: dict[str, Rejection] = {}
        self.connected = False
        self.down = False  # gone for good (Faults.write_permanent), until a test sets it back
        self.commits = 0
        self.ambiguous_commits = 0
        self.offered = 0
        self.ambiguous = Counter[str]()  # logins, rejections, offered: of commits that reported failure
        self.stored_twice: list[str] = []
        self._lock = threading.Lock()

    def connect(self) -> None:
        self.faults.tick()
        if self.down:
            raise DatabaseUnavailable("fake: gone for good")
        if self.faults.hit(self.faults.connect_error):
            raise SchemaBusy("fake lock wait") if self.faults.hit(0.5) else DatabaseUnavailable("fake refused")
        self.connected = True

    def holds(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self.logins or message_id in self.rejections

    def write(
        self, logins: Sequence[MaskedLogin], rejections: Sequence[Rejection], *, redelivered: bool = False
    ) -> WriteResult:
        self.faults.tick()
        if not self.connected:
            raise DatabaseUnavailable("not connected")
        self.faults.maybe_slow()
        if self.down or self.faults.hit(self.faults.write_permanent):
            self.down, self.connected, self.faults.broken = True, False, True
            raise DatabaseUnavailable("fake: gone for good")
        if self.faults.hit(self.faults.write_error):
            self.connected = False
            raise DatabaseUnavailable("fake outage")
        bad_logins = [
            (row, "refused by PostgreSQL: 22001 fake") for row in logins if row.message_id in self.refuse_logins
        ]
        bad_rejections = [
            (row, "refused by PostgreSQL: 23514 fake")
            for row in rejections
            if row.message_id in self.refuse_rejections and (row.sent_at is not None or self.refuse_minimal)
        ]
        if bad_logins or bad_rejections:
            raise DatabaseRejectedRows(bad_logins, bad_rejections)
        with self._lock:
            inserted = rejected = 0
            stored_rejections: set[str] = set()
            for row in logins:
                if row.message_id in self.logins:
                    continue
                if row.message_id in self.rejections:
                    if redelivered:
                        continue  # PostgresWriter's staged path skips messages already quarantined
                    self.stored_twice.append(row.message_id)  # its straight COPY would not
                self.logins[row.message_id] = row
                inserted += 1
            for rejection in rejections:
                if rejection.message_id in self.rejections or rejection.message_id in self.logins:
                    continue
                self.rejections[rejection.message_id] = rejection
                stored_rejections.add(rejection.message_id)
                rejected += 1
            self.commits += 1
            self.offered += len(logins) + len(rejections)
        if self.faults.hit(self.faults.write_error_after_commit):
            self.connected = False
            self.ambiguous_commits += 1
            self.ambiguous.update(logins=inserted, rejections=rejected, offered=len(logins) + len(rejections))
            raise DatabaseUnavailable("fake: connection lost after COMMIT was sent")
        return WriteResult(
            inserted=inserted,
            rejected=rejected,
            duplicates=len(logins) + len(rejections) - inserted - rejected,
            rejected_ids=frozenset(stored_rejections),
        )


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


class FailingSink(FakeSink):
    """A sink whose writes fail (DatabaseUnavailable) the first `failures` times."""

    def __init__(self, failures: float) -> None:
        super().__init__()
        self.failures = failures
        self.attempts = 0

    def write(
        self, logins: Sequence[MaskedLogin], rejections: Sequence[Rejection], *, redelivered: bool = False
    ) -> WriteResult:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise DatabaseUnavailable("connection refused (fake)")
        return super().write(logins, rejections, redelivered=redelivered)
