"""A standard SQS queue in memory, on a virtual clock: the model behind the consume loop's unit tests
and the simulation. Each behaviour is the one the SQS documentation gives (the contract suite,
tests/integration/test_contract_sqs.py, runs the same scenarios against the emulators):

- a received message is hidden until its visibility deadline (receive time + the queue's
  VisibilityTimeout), then visible again, received with a new receipt handle and an
  ApproximateReceiveCount one higher; nothing reappears at random;
- ChangeMessageVisibility sets the deadline to exactly now + the value given (0: visible now); it
  is refused for a message not in flight, or with a receipt handle that is not the latest;
- DeleteMessage with the latest receipt handle deletes (also after the deadline passed, until the
  next receive); with an older one it "succeeds, but the message might not be deleted" (it is not);
  with a handle never issued it fails (ReceiptHandleIsInvalid);
- at most 10 messages per receive;
- a redrive policy: a message received `max_receive_count` times moves to `dead_letters` at the
  receive that would deliver it once more;
- faults, on purpose only: a message in flight delivered again, a deleted message delivered again
  ("on rare occasions ... you might receive a message even after you delete it"), and a pause of the
  whole process longer than the timeout.

Time: `clock.now()`. A clock that nobody advances (the default) means nothing ever expires.
A FIFO queue is FakeFifoQueue (tests/fake_fifo_queue.py), a subclass: it chooses what a receive
takes (`_take`) and deduplicates sends.
"""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aws.limits import BATCH_LIMIT as MAX_MESSAGES_PER_RECEIVE  # the fake keeps SQS's limit
from aws.sqs import QueueUnusable, SqsUnavailable
from etl.retry import Clock
from models import ReceivedMessage, ReceiveRoom, body_bytes

# What ReceiveMessage's JSON answer adds to each body (ids, receipt handle, MD5s, attributes): about
# what LocalStack's and SQS's answers measure, so a fake's answer is as large as a real one.
ANSWER_BYTES_PER_MESSAGE = 700


def answer_bytes(messages: Sequence[ReceivedMessage]) -> int:
    """The size of a ReceiveMessage answer holding `messages`, as its Content-Length would say."""
    return sum(body_bytes(m.body) + ANSWER_BYTES_PER_MESSAGE for m in messages)


MS_PER_DAY = 86_400_000
# 2023-11-14 00:00:00 UTC: the default SentTimestamps straddle this midnight.
MIDNIGHT_MS = 1_699_920_000_000


class FakeClock(Clock):
    """Monotonic time that moves only when someone sleeps or `advance`s: 100,000 backoffs take no
    real time. `advance` moves in steps of at most `step_seconds` and runs the `every_step` hooks
    after each (what a real process's timer threads, the visibility keeper's, would do meanwhile)."""

    def __init__(self, start: float = 1000.0, *, step_seconds: float = math.inf) -> None:
        self._now = start
        self._lock = threading.Lock()
        self.slept = 0.0
        self.step_seconds = step_seconds
        self._hooks: list[Callable[[], object]] = []
        # One step and its hooks at a time: steps of two threads must not pile up between hook runs
        # (in a process, the keeper's timer is not held up seconds by a thread switch).
        self._advancing = threading.RLock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        with self._lock:
            self.slept += max(0.0, seconds)
        self.advance(seconds)

    def advance(self, seconds: float, *, hooks: bool = True) -> None:
        """Move time forward by `seconds`; without `hooks`, in one jump (the process was frozen)."""
        left = max(0.0, seconds)
        while left > 0:
            step = min(left, self.step_seconds) if hooks and self._hooks else left
            with self._advancing:
                with self._lock:
                    self._now += step
                left -= step
                if hooks:
                    for hook in list(self._hooks):
                        hook()

    def every_step(self, hook: Callable[[], object]) -> None:
        """Run `hook` after each step of every advance."""
        self._hooks.append(hook)


@dataclass
class Faults:
    """Probabilities of each fault per call (0 = never). Seeded: a run's faults replay from its seed.

    It also keeps what the fakes did, so that a test can tell an injected fault from a bug:
    `broken` (a permanent fault), `stopped` (the stop was injected), `pauses` (virtual times of the
    process pauses) and, per service, the longest run of consecutive failures on one thread
    (`longest_outage`, virtual seconds).
    """

    seed: int = 0
    receive_error: float = 0.0  # SqsUnavailable from ReceiveMessage
    receive_permanent: float = 0.0  # QueueUnusable from ReceiveMessage (the queue deleted mid-run)
    duplicate: float = 0.0  # a message in flight delivered again (SQS is at-least-once)
    ghost: float = 0.0  # a deleted message delivered again (SQS documents it, rarely)
    pause: float = 0.0  # the process freezes for twice the visibility timeout (no extension runs)
    delete_error: float = 0.0  # SqsUnavailable, the deletes not applied
    delete_error_after: float = 0.0  # SqsUnavailable, the deletes applied (the answer was lost)
    delete_refused: float = 0.0  # an entry refused (counted in Failed)
    delete_permanent: float = 0.0  # QueueUnusable from DeleteMessageBatch (DeleteMessage denied)
    extend_error: float = 0.0
    write_error: float = 0.0  # DatabaseUnavailable, nothing committed
    write_error_after_commit: float = 0.0  # committed, but the client saw the connection break
    write_permanent: float = 0.0  # the database gone for good: this and every later connect and write fail
    connect_error: float = 0.0  # DatabaseUnavailable or SchemaBusy from connect()
    slow: float = 0.0  # a call takes a little real time, and a write 1.5 visibility timeouts of virtual time
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
        self.stopped = False
        self.pauses: list[float] = []
        self.longest_outage: dict[str, float] = {}
        self._outage_since: dict[tuple[str, int], float] = {}

    @property
    def any(self) -> bool:
        """True when this plan injects some fault."""
        return any(
            value
            for name, value in vars(self).items()
            if isinstance(value, float) and not name.startswith("_") and name != "seed"
        ) or (self.stop_at_call is not None)

    def tick(self) -> None:
        """Count one call to a fake; stop the run when its call comes."""
        with self._lock:
            due = self.calls == self.stop_at_call
            self.calls += 1
        if due:
            self.stopped = True
            self.on_stop()

    def hit(self, probability: float) -> bool:
        if probability <= 0:
            return False
        with self._lock:
            return self._rng.random() < probability

    def choice(self, items: Sequence[str]) -> str:
        with self._lock:
            return self._rng.choice(items)

    def maybe_slow(self) -> bool:
        if self.hit(self.slow):
            time.sleep(0.001)
            return True
        return False

    def failed(self, service: str, started: float, now: float) -> None:
        """A call to `service` made at `started` failed at `now` on this thread: its run of failures
        goes on (or starts at `started`)."""
        key = (service, threading.get_ident())
        with self._lock:
            since = self._outage_since.setdefault(key, started)
            self.longest_outage[service] = max(self.longest_outage.get(service, 0.0), now - since)

    def succeeded(self, service: str) -> None:
        with self._lock:
            self._outage_since.pop((service, threading.get_ident()), None)


def spread_timestamps(count: int, rng: random.Random | None = None) -> list[int | None]:
    """SentTimestamps (ms) for `count` messages: 10 s to 70 s apart, straddling a UTC midnight; with
    `rng`, also drawn: an offset, and about one in twelve absent (SQS omits the attribute when it is
    not asked for, and an emulator may)."""
    start = MIDNIGHT_MS - 30_000 * (count // 2)
    stamps: list[int | None] = []
    at = start + (rng.randint(-3_600_000, 3_600_000) if rng else 0)
    for n in range(count):
        at += rng.randint(10_000, 70_000) if rng else 30_000 + n % 7
        stamps.append(None if rng and rng.random() < 1 / 12 else at)
    return stamps


@dataclass
class QueuedMessage:
    """One message as the fake queue holds it."""

    message_id: str
    body: str
    sent_timestamp_ms: int | None
    receives: int = 0
    handle: str | None = None  # the latest receipt handle
    visible_at: float = -math.inf  # in flight while now < visible_at
    deleted: bool = False
    handles: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reappearance:
    """A message visible again while a consumer held it: its receipt neither deleted, nor in a
    failed or refused call. Seen when it is received again, or when its holder deletes or extends
    it too late."""

    message_id: str
    handle: str  # the receipt handle held
    consumer: str  # who received it with that handle
    received_at: float  # virtual time of that receive
    at: float  # virtual time it was seen visible
    cause: str  # "received again", "deleted too late", "extended too late", or "duplicate" (injected)


class FakeQueue:
    """A standard SQS queue (see the module docstring). `stored` tells whether the sink holds a
    message: deleting one it does not hold is recorded in `early_deletes` (the invariant "no delete
    before its commit")."""

    def __init__(
        self,
        bodies: Sequence[tuple[str, str]],
        faults: Faults | None = None,
        stored: Callable[[str], bool] | None = None,
        *,
        clock: FakeClock | None = None,
        visibility_timeout_seconds: int = 30,
        max_receive_count: int | None = None,
        sent_timestamps: Sequence[int | None] | None = None,
    ) -> None:
        stamps = list(sent_timestamps) if sent_timestamps is not None else spread_timestamps(len(bodies))
        self._messages = {
            message_id: QueuedMessage(message_id, body, stamp)
            for (message_id, body), stamp in zip(bodies, stamps, strict=True)
        }
        self.bodies = dict(bodies)
        self.faults = faults or Faults()
        self.stored = stored or (lambda message_id: True)
        self.clock = clock or FakeClock()
        self.visibility_timeout_seconds = visibility_timeout_seconds
        self.max_receive_count = max_receive_count
        self._receipts = itertools.count(1)
        self._holders: dict[str, tuple[str, float]] = {}  # receipt handle -> consumer, receive time
        self._lock = threading.Lock()
        self.deleted: set[str] = set()  # ids ever deleted
        self.dead_letters: list[str] = []
        self.early_deletes: list[str] = []
        self.reappeared: list[Reappearance] = []
        self._seen_visible: set[str] = set()
        self.troubled: set[str] = set()  # receipt handles of failed or refused delete / extend calls
        self.permanent_failures = 0
        self.empty_wait_seconds = 0.002  # real time an empty receive takes (a drain must not spin)
        self.empty_receive_seconds = 0.0  # virtual time it takes (the long poll's wait)

    # -- SQS's actions ----------------------------------------------------------------------------

    def receive(self, consumer: str = "") -> list[ReceivedMessage]:
        """ReceiveMessage: at most 10 visible messages, each with a new receipt handle."""
        started = self.clock.now()
        self.faults.tick()
        self.faults.maybe_slow()
        if self.faults.hit(self.faults.pause):
            self.faults.pauses.append(self.clock.now())
            self.clock.advance(2 * self.visibility_timeout_seconds, hooks=False)
        if self.faults.hit(self.faults.receive_error):
            self.faults.failed("SQS receive", started, self.clock.now())
            raise SqsUnavailable("ReceiveMessage failed: fake outage")
        if self.faults.hit(self.faults.receive_permanent):
            self.permanent_failures += 1
            self.faults.broken = True
            raise QueueUnusable("ReceiveMessage failed: AWS.SimpleQueueService.NonExistentQueue (fake)")
        self.faults.succeeded("SQS receive")
        with self._lock:
            now = self.clock.now()
            self._maybe_ghost(now)
            taken = [(message, "received again") for message in self._take(now)]
            in_flight = [m for m in self._messages.values() if not m.deleted and m.visible_at > now]
            if in_flight and len(taken) < MAX_MESSAGES_PER_RECEIVE and self.faults.hit(self.faults.duplicate):
                taken.append((in_flight[0], "duplicate"))
            delivered = [self._deliver(message, cause, consumer, now) for message, cause in taken]
        if not delivered:
            self.clock.advance(self.empty_receive_seconds)
            time.sleep(self.empty_wait_seconds)
        return delivered

    def receive_within(self, room: ReceiveRoom, consumer: str = "") -> list[ReceivedMessage]:
        """ReceiveMessage through a client that takes room for the answer before reading it (the
        JSON transport, by its Content-Length): refused (the consumer is stopping), the answer is
        dropped unread; SQS delivered its messages all the same, and they reappear at their deadline."""
        delivered = self.receive(consumer)
        if delivered and not room.take(answer_bytes(delivered)):
            self._trouble(delivered)  # their reappearance is explained: nobody read them
            return []
        return delivered

    def _take(self, now: float) -> list[QueuedMessage]:
        """The messages a receive at `now` delivers (the caller holds the lock): the first 10
        visible, in send order; those received `max_receive_count` times go to `dead_letters`."""
        taken: list[QueuedMessage] = []
        for message in self._messages.values():
            if len(taken) == MAX_MESSAGES_PER_RECEIVE:
                break
            if message.deleted or message.visible_at > now:
                continue
            if self._redriven(message):
                continue
            taken.append(message)
        return taken

    def _redriven(self, message: QueuedMessage) -> bool:
        """Move `message` to the dead-letter queue if it was received `max_receive_count` times."""
        if self.max_receive_count is None or message.receives < self.max_receive_count:
            return False
        message.deleted = True
        self.dead_letters.append(message.message_id)
        return True

    def _maybe_ghost(self, now: float) -> None:
        if self.deleted and self.faults.hit(self.faults.ghost):
            message = self._messages[self.faults.choice(sorted(self.deleted))]
            if message.deleted and message.message_id not in self.dead_letters:
                message.deleted = False
                message.visible_at = now
                message.handle = None  # its last handle was deleted: nobody holds it

    def _deliver(self, message: QueuedMessage, cause: str, consumer: str, now: float) -> ReceivedMessage:
        if message.handle is not None:
            self._reappears(message.handle, message.message_id, now, cause)
        handle = f"{message.message_id}#{next(self._receipts)}"
        message.handle = handle
        message.handles.append(handle)
        message.receives += 1
        message.visible_at = now + self.visibility_timeout_seconds
        self._holders[handle] = (consumer, now)
        return ReceivedMessage(
            message_id=message.message_id,
            receipt_handle=handle,
            body=message.body,
            sent_timestamp_ms=message.sent_timestamp_ms,
            receive_count=message.receives,
            received_at=now,
        )

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        """DeleteMessageBatch: the ids of the entries refused (an invalid handle, or a fault)."""
        self.faults.tick()
        self.faults.maybe_slow()
        if self.faults.hit(self.faults.delete_error):
            self._trouble(messages)
            raise SqsUnavailable("DeleteMessageBatch failed: fake outage")
        if self.faults.hit(self.faults.delete_permanent):
            self.permanent_failures += 1
            self.faults.broken = True
            raise QueueUnusable("DeleteMessageBatch failed: AccessDenied (fake)")
        refused: list[str] = []
        with self._lock:
            for entry in messages:
                message = self._messages.get(entry.message_id)
                if not self.stored(entry.message_id):
                    self.early_deletes.append(entry.message_id)
                if message is None or entry.receipt_handle not in message.handles:
                    refused.append(entry.message_id)  # ReceiptHandleIsInvalid
                    continue
                if self.faults.hit(self.faults.delete_refused):
                    self.troubled.add(entry.receipt_handle)
                    refused.append(entry.message_id)
                    continue
                if entry.receipt_handle == message.handle and not message.deleted:
                    if message.visible_at <= self.clock.now():
                        self._reappears(message.handle, message.message_id, self.clock.now(), "deleted too late")
                    message.deleted = True
                    self.deleted.add(message.message_id)
                # An older handle: the request succeeds and the message is not deleted (documented).
        if self.faults.hit(self.faults.delete_error_after):
            raise SqsUnavailable("DeleteMessageBatch failed: fake outage after the deletes")
        return refused

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        """ChangeMessageVisibilityBatch: the deadline becomes now + `timeout_seconds`, exactly; return
        the receipt handles refused (not in flight, or not the message's latest)."""
        self.faults.tick()
        if self.faults.hit(self.faults.extend_error):
            self._trouble(messages)
            raise SqsUnavailable("ChangeMessageVisibilityBatch failed: fake outage")
        refused: list[str] = []
        with self._lock:
            now = self.clock.now()
            for entry in messages:
                message = self._messages.get(entry.message_id)
                if (
                    message is None
                    or message.deleted
                    or entry.receipt_handle != message.handle
                    or message.visible_at <= now
                ):
                    if message is not None and entry.receipt_handle == message.handle and not message.deleted:
                        self._reappears(message.handle, message.message_id, now, "extended too late")
                    refused.append(entry.receipt_handle)  # MessageNotInflight / ReceiptHandleIsInvalid
                    continue
                message.visible_at = now + timeout_seconds
        return refused

    def _reappears(self, handle: str, message_id: str, now: float, cause: str) -> None:
        """Record a message visible again in its holder's hands (unless a fault already explains it)."""
        if handle in self.troubled or handle in self._seen_visible:
            return
        self._seen_visible.add(handle)
        consumer, received_at = self._holders[handle]
        self.reappeared.append(Reappearance(message_id, handle, consumer, received_at, now, cause))

    def _trouble(self, messages: Sequence[ReceivedMessage]) -> None:
        with self._lock:
            self.troubled.update(m.receipt_handle for m in messages)

    def send(self, body: str) -> str:
        """SendMessage: a new message, visible now; its id."""
        with self._lock:
            return self._enqueue(body)

    def _enqueue(self, body: str) -> str:
        """Add a message, visible now; its id (the caller holds the lock)."""
        message_id = f"sent-{len(self._messages):05d}"
        stamp = MIDNIGHT_MS + 1000 * len(self._messages)
        self._messages[message_id] = QueuedMessage(message_id, body, stamp)
        self.bodies[message_id] = body
        return message_id

    # -- for the tests ---------------------------------------------------------------------------

    def consumer(self, name: str) -> QueueClient:
        """A client of this queue for one consumer (its receives are attributed to `name`)."""
        return QueueClient(self, name)

    def expire_all(self) -> None:
        """Every message in flight becomes visible now (as if its deadline passed); not a reappearance."""
        with self._lock:
            now = self.clock.now()
            for message in self._messages.values():
                if not message.deleted and message.visible_at > now:
                    message.visible_at = now
                if message.handle is not None:
                    self.troubled.add(message.handle)

    def as_received(self, message_id: str) -> ReceivedMessage:
        """`message_id` as the queue would deliver it (for its create_date)."""
        message = self._messages[message_id]
        return ReceivedMessage(message_id, "-", message.body, message.sent_timestamp_ms)

    def receive_count(self, message_id: str) -> int:
        with self._lock:
            return self._messages[message_id].receives

    @property
    def visible(self) -> int:
        with self._lock:
            now = self.clock.now()
            return sum(1 for m in self._messages.values() if not m.deleted and m.visible_at <= now)

    @property
    def left(self) -> int:
        """Messages not deleted (visible or in flight); those moved to the dead-letter queue are not."""
        with self._lock:
            return sum(1 for m in self._messages.values() if not m.deleted)


class QueueClient:
    """One consumer's client of a FakeQueue (MessageSource)."""

    def __init__(self, queue: FakeQueue, name: str) -> None:
        self.queue = queue
        self.name = name

    def receive(self) -> list[ReceivedMessage]:
        return self.queue.receive(self.name)

    def receive_within(self, room: ReceiveRoom) -> list[ReceivedMessage]:
        return self.queue.receive_within(room, self.name)

    def delete(self, messages: Sequence[ReceivedMessage]) -> list[str]:
        return self.queue.delete(messages)

    def change_visibility(self, messages: Sequence[ReceivedMessage], timeout_seconds: int) -> list[str]:
        return self.queue.change_visibility(messages, timeout_seconds)
