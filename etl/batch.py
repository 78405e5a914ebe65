"""A batch's way from the receivers to the writer: each receive prepared (`prepare`: parsed,
masked, or quarantined), the bytes in hand bounded (BytesInHand), the prepared receives gathered
(Batcher) into the messages of one transaction (Batch), and what this process quarantined lately
(RecentQuarantine)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from config import PipelineOptions
from etl.transform import DEFAULT_MAX_BODY_BYTES, TOO_LARGE, poison_rule, reject, too_large, transform
from models import MaskedLogin, ReceivedMessage, Rejection, body_bytes
from pii.masking import Masker

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Prepared:
    """Messages of one receive, parsed and masked: rows, rejections, and those left for redelivery.

    `nbytes`: what it holds in memory, roughly: the bodies still held and the encrypted bodies of
    its rejections (the consume loop's bound on bytes in hand counts it).
    """

    messages: list[ReceivedMessage]
    rows: list[MaskedLogin] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    failed: list[ReceivedMessage] = field(default_factory=list)
    nbytes: int = 0


def prepare(
    messages: list[ReceivedMessage], masker: Masker, max_receives: int, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> Prepared:
    """Transform each message; one that raises unexpectedly goes through the poison rule.

    The body of a message quarantined as too large is let go at once (emptied): only its bounded
    Rejection is kept, so a flood of large bodies does not stay in memory until the commit.
    """
    prepared = Prepared(messages)
    nbytes = 0
    for message in messages:
        result: MaskedLogin | Rejection | None
        try:
            result = too_large(message, masker, max_body_bytes) or transform(message, masker)
        except Exception as exc:  # noqa: BLE001 - a bug or an unexpected condition, not a bad body
            result = poison_rule(message, exc, masker, max_receives)
        if result is None:
            prepared.failed.append(message)
        elif isinstance(result, Rejection):
            prepared.rejections.append(result)
            nbytes += len(result.encrypted_body)
            if result.reason.startswith(TOO_LARGE):
                message.body = ""  # not needed again: the Rejection holds what is kept of it
            logger.warning(
                "message %s rejected: %s",
                message.message_id,
                result.reason,
                extra={"message_id": message.message_id, "reason": result.reason},
            )
        else:
            prepared.rows.append(result)
        nbytes += body_bytes(message.body)
    prepared.nbytes = nbytes
    return prepared


class Batch:
    """The messages of one transaction, keyed by message id.

    A message received twice in one batch (SQS delivers at least once) is written once. If one copy
    was transformed and another raised, the message is stored all the same, so every copy's receipt
    is deleted after the commit: none is left in hand.
    """

    def __init__(self, parts: Sequence[Prepared]) -> None:
        self.messages = [m for part in parts for m in part.messages]
        self.rows = {row.message_id: row for part in parts for row in part.rows}
        self.rejections = {r.message_id: r for part in parts for r in part.rejections}
        self._by_id = {m.message_id: m for m in self.messages}
        self._failed_ids = {m.message_id for part in parts for m in part.failed}
        self._fallbacks: set[str] = set()
        self._deletable: list[ReceivedMessage] | None = None  # deletable(), once it is asked (after the commit)

    @property
    def redelivered(self) -> int:
        return sum(1 for m in self.messages if m.receive_count > 1)

    def quarantine_refused(
        self, logins: Sequence[tuple[MaskedLogin, str]], rejections: Sequence[tuple[Rejection, str]], masker: Masker
    ) -> None:
        """Rows PostgreSQL refused alone: a login becomes a rejection with PostgreSQL's reason; a
        rejection is replaced by a minimal one; a minimal one refused too leaves its message for
        redelivery (SQS dead-letters it after the RedrivePolicy's maxReceiveCount)."""
        self._deletable = None
        for login, reason in logins:
            del self.rows[login.message_id]
            self.rejections[login.message_id] = reject(
                self._by_id[login.message_id], masker, reason, "refused_by_database"
            )
            logger.warning(
                "message %s rejected: %s",
                login.message_id,
                reason,
                extra={"message_id": login.message_id, "reason": reason},
            )
        for rejection, reason in rejections:
            message_id = rejection.message_id
            if message_id in self._fallbacks:
                del self.rejections[message_id]
                self._failed_ids.add(message_id)
                logger.error(
                    "message %s cannot be stored in either table (%s); left for redelivery",
                    message_id,
                    reason,
                    extra={"message_id": message_id, "reason": reason},
                )
                continue
            self._fallbacks.add(message_id)
            self.rejections[message_id] = Rejection(
                message_id=message_id,
                reason=f"quarantine row {reason}; original reason dropped",
                encrypted_body=rejection.encrypted_body,
                sent_at=None,
                # Kept: an integer PostgreSQL cannot refuse, and the writer's quarantine lock is
                # taken alone for a redelivered copy (database/sqs_postgres.py, write()).
                receive_count=rejection.receive_count,
                kind="refused_by_database",
            )
            logger.warning(
                "message %s: its quarantine row was refused (%s); storing a minimal one",
                message_id,
                reason,
                extra={"message_id": message_id, "reason": reason},
            )

    @property
    def failed(self) -> list[ReceivedMessage]:
        """Copies of messages neither stored nor quarantined: left to come back after the timeout."""
        stored = self.rows.keys() | self.rejections.keys()
        return [m for m in self.messages if m.message_id in self._failed_ids and m.message_id not in stored]

    def deletable(self) -> list[ReceivedMessage]:
        """After the commit: every receipt of every message the transaction stored or quarantined
        (computed once: the loop and its metrics both ask)."""
        if self._deletable is None:
            stored = self.rows.keys() | self.rejections.keys()
            self._deletable = [m for m in self.messages if m.message_id in stored]
        return self._deletable


class RecentQuarantine:
    """The ids this process quarantined lately (bounded): a later batch holding one of them must be
    written with the one-table check, even if its copy is a first delivery. (SQS can deliver a
    message twice at once; the poison rule may quarantine one copy while the other loads.)"""

    def __init__(self, size: int = 100_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def remember(self, message_ids: Iterable[str]) -> None:
        for message_id in message_ids:
            self._ids[message_id] = None
        while len(self._ids) > self._size:
            self._ids.popitem(last=False)

    def holds_any(self, message_ids: Iterable[str]) -> bool:
        return any(message_id in self._ids for message_id in message_ids)


# How long the writer waits on an empty inbox before it looks around again (the liveness turn).
IDLE_WAIT_SECONDS = 0.5


class Inbox:
    """The receivers' prepared receives, and each receiver's None as it ends, on their way to the
    writer: a bounded first-in first-out queue whose taker sleeps until it has a reason to wake.

    `put` blocks while `maxsize` items wait (back-pressure on the receivers, as queue.Queue's). The
    taker asks with `wait(timeout, messages, nbytes)` to be woken once the inbox holds that many
    messages or bytes (what its batch lacks), or a receiver's end, or at the timeout (its batch's
    age); `get_nowait` then takes the items one by one. queue.Queue would wake the writer at every
    put: a thread switch, and two hand-offs of the GIL, for every receive of 10 messages, where one
    per batch is enough (docs/benchmarks.md, "CPU per message").
    """

    def __init__(self, maxsize: int) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # the taker waits on it
        self._room = threading.Condition(self._lock)  # receivers wait on it while the inbox is full
        self._items: deque[Prepared | None] = deque()
        self._maxsize = maxsize
        self._messages = 0  # in the items waiting
        self._nbytes = 0
        self._ends = 0  # Nones waiting
        self._putters = 0  # receivers waiting for room
        self._wake_at: tuple[int, int] | None = None  # while the taker waits: (messages, bytes)

    def put(self, item: Prepared | None) -> None:
        """Add a receive's prepared messages (None: a receiver ends); blocks while the inbox is full."""
        with self._lock:
            while len(self._items) >= self._maxsize:
                self._putters += 1
                try:
                    self._room.wait()
                finally:
                    self._putters -= 1
            self._items.append(item)
            if item is None:
                self._ends += 1
            else:
                self._messages += len(item.messages)
                self._nbytes += item.nbytes
            if self._wake_at is not None and self._due(*self._wake_at):
                self._wake_at = None
                self._ready.notify()

    def get_nowait(self) -> Prepared | None:
        """The oldest item; raises queue.Empty when there is none."""
        with self._lock:
            if not self._items:
                raise queue.Empty
            item = self._items.popleft()
            if item is None:
                self._ends -= 1
            else:
                self._messages -= len(item.messages)
                self._nbytes -= item.nbytes
            if self._putters:
                self._room.notify()
            return item

    def wait(self, timeout: float, messages: int, nbytes: int) -> None:
        """Return once the inbox holds `messages` messages or `nbytes` bytes or a receiver's end, or
        after `timeout` seconds."""
        with self._lock:
            if self._due(messages, nbytes):
                return
            self._wake_at = (messages, nbytes)
            try:
                self._ready.wait(timeout)
            finally:
                self._wake_at = None

    def _due(self, messages: int, nbytes: int) -> bool:
        return self._ends > 0 or (bool(self._items) and (self._messages >= messages or self._nbytes >= nbytes))


class BytesInHand:
    """The bytes of the messages in hand, bounded: what receivers got and the writer has not yet
    committed, plus each receive's share (a Claim) while its response is read and prepared.

    A receive's share is taken before its response is read, waiting while it would pass `limit`
    (back-pressure: the writer is behind, or large bodies are in hand): the response's own size
    where the source knows it first (SQS's Content-Length, aws.sqs), else its worst case
    (`per_receive`: SQS may return 10 messages of the queue's largest size). Once prepared, the
    share is settled to what the messages actually hold; the writer `release`s a batch's bytes once
    it has committed. So the bytes in hand never pass `limit` (one share alone always goes), and a
    receive of small messages never waits for room sized for 10 of the largest.
    """

    def __init__(self, limit: int, per_receive: int) -> None:
        self.limit = limit
        self.per_receive = min(per_receive, limit)  # one receive always fits
        self._held = 0
        self._changed = threading.Condition()

    @property
    def batch_bytes(self) -> int:
        """Where a batch is cut: half the bound (the next batch gathers while one is written), and
        never so much that a receive would wait for room while the batch waits for its age."""
        return max(1, min(self.limit // 2, self.limit - self.per_receive))

    @property
    def held(self) -> int:
        """Bytes held or taken now."""
        return self._held

    def claim(self, stopping: Callable[[], bool]) -> Claim:
        """A new receive's share (nothing taken yet); its waits end with False once `stopping()`."""
        return Claim(self, stopping)

    def wait_for_room(self, stopping: Callable[[], bool]) -> bool:
        """Wait while the bytes in hand are at the bound; False once `stopping()`."""
        with self._changed:
            while self._held >= self.limit:
                if stopping():
                    return False
                self._changed.wait(0.1)
            return True

    def take(self, nbytes: int, stopping: Callable[[], bool]) -> bool:
        """Wait until `nbytes` more fit under the bound, or nothing is held (one share alone always
        goes, whatever its size), and take them; False (nothing taken) once `stopping()`."""
        with self._changed:
            while self._held and self._held + nbytes > self.limit:
                if stopping():
                    return False
                self._changed.wait(0.1)
            self._held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        """`nbytes` are no longer in hand (committed, settled, or never received)."""
        with self._changed:
            self._held -= nbytes
            # Wake only the receivers the room fits (each wakes, takes, and goes): waking them
            # all at every settle cost more CPU than the receives of a fast queue.
            free = self.limit - self._held
            if free > 0:
                self._changed.notify(max(1, free // self.per_receive))


class Claim:
    """One receive's share of the bytes in hand (models.ReceiveRoom): taken before its response is
    read, settled to what its prepared messages hold."""

    def __init__(self, in_hand: BytesInHand, stopping: Callable[[], bool]) -> None:
        self._in_hand = in_hand
        self._stopping = stopping
        self.worst_case = in_hand.per_receive
        self.held = 0

    def take(self, nbytes: int | None) -> bool:
        """Make the share `nbytes` (None: the worst case), waiting for room; False once stopping
        (the share is then empty). A retried receive takes again: the share is replaced."""
        self.settle(0)
        wanted = self.worst_case if nbytes is None else nbytes
        if not self._in_hand.take(wanted, self._stopping):
            return False
        self.held = wanted
        return True

    def settle(self, nbytes: int) -> None:
        """The share becomes `nbytes` (what the prepared messages hold; 0: none), without waiting."""
        if nbytes != self.held:
            self._in_hand.release(self.held - nbytes)
            self.held = nbytes


_NOTHING = Prepared([])  # what the Batcher took when its wait ended with the inbox empty


class Batcher:
    """Gathers the receivers' prepared messages into batches: a batch is cut when it holds
    `batch_size` messages or `batch_bytes` bytes (BytesInHand.batch_bytes), when its oldest message
    is `flush_seconds` old, or when every one of `receivers` has finished (each puts None into the
    inbox when it ends)."""

    def __init__(
        self,
        inbox: Inbox,
        options: PipelineOptions,
        *,
        batch_bytes: int,
        on_turn: Callable[[], None],
    ) -> None:
        self._inbox = inbox
        self._live = options.receivers
        self._batch_size = options.batch_size
        self._batch_bytes = batch_bytes
        self._nbytes = 0
        self._flush_seconds = options.flush_seconds
        self._on_turn = on_turn
        self._parts: list[Prepared] = []
        self._size = 0
        self._oldest = 0.0

    def take(self) -> list[Prepared] | None:
        """The next batch (blocking until one is due); None once every receiver has finished and
        nothing is left."""
        while self._live:
            self._on_turn()
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                # Asleep until the batch can be cut: what it lacks has come, or a receiver ended,
                # or its oldest message's age comes due (an empty batch: the first part, or the turn).
                if self._parts:
                    timeout = max(0.0, self._oldest + self._flush_seconds - time.monotonic())
                    self._inbox.wait(timeout, self._batch_size - self._size, self._batch_bytes - self._nbytes)
                else:
                    self._inbox.wait(IDLE_WAIT_SECONDS, 1, 1)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = _NOTHING  # the oldest message's age may have come due
            if item is not _NOTHING:
                if item is None:
                    self._live -= 1
                else:
                    if not self._parts:
                        self._oldest = time.monotonic()
                    self._parts.append(item)
                    self._size += len(item.messages)
                    self._nbytes += item.nbytes
            if self._parts and (
                self._size >= self._batch_size
                or self._nbytes >= self._batch_bytes
                or time.monotonic() - self._oldest >= self._flush_seconds
                or not self._live
            ):
                parts, self._parts, self._size, self._nbytes = self._parts, [], 0, 0
                return parts
        return None
