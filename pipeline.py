"""The consume loop: receive -> parse and mask -> one transaction -> delete.

Ordering (the promise "no message lost, none stored twice"):

1. Receiver threads long-poll SQS, parse and mask what they received, and hand it to a bounded
   inbox (back-pressure: when the database is slower than the queue, receivers wait instead of
   buffering without limit). Parsing and masking thus overlap the writer's commits.
2. The writer gathers received messages into a batch, flushed by size or by the age of its
   oldest message; writes logins and rejections in ONE transaction; and only after the commit
   hands the batch to the deleters.
3. Deletes of batch k run while batch k+1 is received and written. A crash anywhere before a
   delete leaves the message in the queue; it comes back and is not stored again (the unique
   `message_id`; see database/sqs_postgres.py).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar

from aws.sqs import MAX_ENTRIES_PER_DELETE as MAX_DELETE_ENTRIES
from aws.sqs import InHand, SqsError, SqsReader, SqsUnavailable
from database.sqs_postgres import DatabaseRejectedRows, DatabaseUnavailable, PostgresWriter, WriteResult
from models import InvalidMessage, LoginEvent, MaskedLogin, ReceivedMessage, Rejection
from observability import Observer, Stats
from pii.masking import BODY_FIELD, Masker

logger = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_BASE_SECONDS = 0.2
BACKOFF_CAP_SECONDS = 10.0


# Defaults measured on a 2-core machine with the embedded LocalStack (see bench/ and README).
DEFAULT_RECEIVERS = 8
DEFAULT_DELETERS = 8
DEFAULT_BATCH_SIZE = 1000
DEFAULT_FLUSH_SECONDS = 0.5


class ServiceLost(Exception):
    """Raised when SQS or PostgreSQL stayed unreachable beyond the retry budget (drain mode)."""


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """How the loop runs; defaults measured on a 2-core machine (see bench/)."""

    follow: bool = False
    receivers: int = DEFAULT_RECEIVERS
    deleters: int = DEFAULT_DELETERS
    batch_size: int = DEFAULT_BATCH_SIZE
    flush_seconds: float = DEFAULT_FLUSH_SECONDS
    retry_budget_seconds: float = 60.0
    # The queue's VisibilityTimeout: messages held longer than about half of it are extended.
    visibility_timeout_seconds: int = 30
    # A message whose processing raised an unexpected error is left for redelivery; from this
    # many receives on it is quarantined instead (kept below the RedrivePolicy's maxReceiveCount).
    max_receives: int = 5


def transform(message: ReceivedMessage, masker: Masker) -> MaskedLogin | Rejection:
    """Parse and mask one message: a row for `user_logins`, or a Rejection with its reason."""
    try:
        event = LoginEvent.from_body(message.body)
    except InvalidMessage as exc:
        return reject(message, masker, str(exc))
    return MaskedLogin(
        message_id=message.message_id,
        user_id=event.user_id,
        device_type=event.device_type,
        masked_ip=masker.mask("ip", event.ip),
        masked_device_id=masker.mask("device_id", event.device_id),
        locale=event.locale,
        app_version=event.app_version,
        create_date=message.sent_date or datetime.now(timezone.utc).date(),
    )


def reject(message: ReceivedMessage, masker: Masker, reason: str) -> Rejection:
    """A Rejection whose body is encrypted whole: a bad body may hold PII anywhere."""
    return Rejection(
        message_id=message.message_id,
        reason=reason,
        encrypted_body=masker.mask(BODY_FIELD, message.body),
        sent_at=message.sent_at,
        receive_count=message.receive_count,
    )


@dataclass(slots=True)
class Prepared:
    """Messages of one receive, parsed and masked: rows, rejections, and those left for redelivery."""

    messages: list[ReceivedMessage]
    rows: list[MaskedLogin] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    failed: list[ReceivedMessage] = field(default_factory=list)


class Pipeline:
    """Runs receivers, the writer and the deleters until the queue is drained or stop() is called."""

    def __init__(
        self,
        reader: SqsReader,
        writer: PostgresWriter,
        masker: Masker,
        options: PipelineOptions,
        observer: Observer | None = None,
    ) -> None:
        self._observer = observer or Observer()
        self._reader = reader
        self._writer = writer
        self._masker = masker
        self._options = options
        self._stop = threading.Event()
        self._inbox: queue.Queue[Prepared | None] = queue.Queue(
            maxsize=max(4, 2 * options.batch_size // 10)
        )
        self._fatal: BaseException | None = None
        self._in_hand = InHand(options.visibility_timeout_seconds)
        self.stats = Stats()

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop receiving; the batch in hand is still committed and deleted."""
        self._stop.set()

    def run(self) -> Stats:
        """Consume until drained (or stopped); return the counters.

        The work runs in other threads; the calling (main) thread only waits, so that signal
        handlers run at once even while a commit blocks inside libpq.
        """
        worker = threading.Thread(target=self._work, name="writer", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _work(self) -> None:
        try:
            self._run_stages()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            self._fatal = self._fatal or exc

    def _run_stages(self) -> None:
        receivers = [
            threading.Thread(target=self._receive_loop, name=f"receiver-{i}", daemon=True)
            for i in range(self._options.receivers)
        ]
        for thread in receivers:
            thread.start()
        done = threading.Event()
        extender = threading.Thread(target=self._extend_loop, args=(done,), name="extender", daemon=True)
        extender.start()
        # Leaving the `with` waits for every delete still running.
        with ThreadPoolExecutor(max_workers=self._options.deleters, thread_name_prefix="deleter") as deleters:
            try:
                self._write_loop(deleters)
            finally:
                self._stop.set()
        done.set()

    # -- receiving ----------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        try:
            while not self._stop.is_set():
                messages = self._retry("SQS receive", self._reader.receive, SqsUnavailable, give_up=self._stop.is_set)
                if messages is None:
                    return  # stopped while SQS was unreachable
                if messages:
                    self._put(messages)
                elif not self._options.follow:
                    return  # drained: an empty long poll
        except BaseException as exc:  # noqa: BLE001 - handed to the writer thread, re-raised there
            self._fatal = self._fatal or exc
            self._stop.set()
        finally:
            self._inbox.put(None)  # this receiver is done

    def _put(self, messages: list[ReceivedMessage]) -> None:
        # Blocks while the writer is behind. Messages in hand are never dropped, even when
        # stopping: they are part of the batch that will be committed and deleted.
        self._in_hand.add(messages)
        self._inbox.put(self._prepare(messages))

    def _prepare(self, messages: list[ReceivedMessage]) -> Prepared:
        """Parse and mask in the receiver's thread, while the writer waits on PostgreSQL."""
        prepared = Prepared(messages)
        for message in messages:
            result: MaskedLogin | Rejection | None
            try:
                result = transform(message, self._masker)
            except Exception as exc:  # noqa: BLE001 - a bug or an unexpected condition, not a bad body
                result = self._on_failure(message, exc)
            if result is None:
                prepared.failed.append(message)
            elif isinstance(result, Rejection):
                prepared.rejections.append(result)
                logger.warning("message %s rejected: %s", message.message_id, result.reason,
                               extra={"message_id": message.message_id, "reason": result.reason})
            else:
                prepared.rows.append(result)
        return prepared

    def _extend_loop(self, done: threading.Event) -> None:
        tick = min(1.0, self._in_hand.timeout / 4)
        while not done.wait(tick):
            due = self._in_hand.due()
            if not due:
                continue
            try:
                self._reader.change_visibility(due, self._in_hand.timeout)
                self.stats.extended += len(due)
                logger.info("extended the visibility of %d messages still in hand", len(due))
            except SqsError as exc:
                logger.warning("could not extend the visibility of %d messages: %s", len(due), exc)

    # -- writing ------------------------------------------------------------------------------

    def _write_loop(self, deleters: ThreadPoolExecutor) -> None:
        # At most two batches' worth of delete calls outstanding: memory stays bounded, and the
        # writer goes on with the next batch while the last calls of the previous one finish.
        slots = threading.BoundedSemaphore(max(2, 2 * self._options.batch_size // MAX_DELETE_ENTRIES))
        live = self._options.receivers
        parts: list[Prepared] = []
        size = 0
        oldest = 0.0
        while live:
            timeout = max(0.0, oldest + self._options.flush_seconds - time.monotonic()) if parts else 0.5
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                pass  # the oldest message's age may have come due
            else:
                if item is None:
                    live -= 1
                else:
                    if not parts:
                        oldest = time.monotonic()
                    parts.append(item)
                    size += len(item.messages)
            due = parts and (
                size >= self._options.batch_size
                or time.monotonic() - oldest >= self._options.flush_seconds
                or not live
            )
            if due:
                if self._fatal is not None:
                    return  # a receiver failed for good: do not commit what we cannot delete safely
                committed = self._commit(parts)
                parts, size = [], 0
                # Only now, after the commit: one task per DeleteMessageBatch call, side by side.
                for start in range(0, len(committed), MAX_DELETE_ENTRIES):
                    slots.acquire()
                    deleters.submit(self._delete, committed[start : start + MAX_DELETE_ENTRIES], slots)

    def _commit(self, parts: Sequence[Prepared]) -> list[ReceivedMessage]:
        """Store a batch in one transaction; return its messages that may now be deleted.

        Those left for redelivery (an unexpected processing error) are not among them.
        """
        started = time.monotonic()
        batch = [m for part in parts for m in part.messages]
        self.stats.received += len(batch)
        redelivered = sum(1 for m in batch if m.receive_count > 1)
        self.stats.redelivered += redelivered
        self._observer.on_received(len(batch), redelivered)
        # Keyed by message id: a message received twice in one batch is written once.
        rows = {row.message_id: row for part in parts for row in part.rows}
        rejections = {r.message_id: r for part in parts for r in part.rejections}
        failed = [m for part in parts for m in part.failed]
        self.stats.failed += len(failed)
        by_id = {m.message_id: m for m in batch}
        while True:
            try:
                written = self._retry(
                    "PostgreSQL write",
                    lambda: self._write_once(list(rows.values()), list(rejections.values())),
                    DatabaseUnavailable,
                )
                break
            except DatabaseRejectedRows as exc:
                # Rare: validation let through something PostgreSQL refuses. Quarantine those rows
                # alone and write the rest; the batch around them must not fail.
                for login, reason in exc.bad:
                    del rows[login.message_id]
                    rejections[login.message_id] = reject(by_id[login.message_id], self._masker, reason)
                    logger.warning("message %s rejected: %s", login.message_id, reason,
                                   extra={"message_id": login.message_id, "reason": reason})
        assert written is not None  # the write is never given up on, only budgeted
        self.stats.loaded += written.inserted
        self.stats.rejected += written.rejected
        self.stats.duplicates += written.duplicates
        seconds = time.monotonic() - started
        self._observer.on_commit(len(batch), seconds, written.inserted, written.rejected)
        logger.debug("committed %d messages in %.0f ms: %s", len(batch), seconds * 1000, written,
                     extra={"batch_size": len(batch), "duration_ms": round(seconds * 1000, 1)})
        if not failed:
            return batch
        self._in_hand.remove(failed)  # not extended: they come back after the timeout
        failed_ids = {m.message_id for m in failed}
        return [m for m in batch if m.message_id not in failed_ids]

    def _on_failure(self, message: ReceivedMessage, exc: Exception) -> Rejection | None:
        """Leave a message that failed unexpectedly for redelivery, or quarantine it once it loops."""
        reason = f"processing failed {message.receive_count} times: {type(exc).__name__}"
        if message.receive_count >= self._options.max_receives:
            logger.error("message %s quarantined: %s", message.message_id, reason,
                         extra={"message_id": message.message_id, "reason": reason})
            return reject(message, self._masker, reason)
        logger.error(
            "message %s failed (%s, receive %d of %d before quarantine); left for redelivery",
            message.message_id, type(exc).__name__, message.receive_count, self._options.max_receives,
            extra={"message_id": message.message_id, "error": type(exc).__name__},
        )
        return None

    def _write_once(self, logins: list[MaskedLogin], rejections: list[Rejection]) -> WriteResult:
        if not self._writer.connected:
            self._writer.connect()  # after an outage: reconnect (and re-check the schema)
        return self._writer.write(logins, rejections)

    def _delete(self, batch: Sequence[ReceivedMessage], slots: threading.BoundedSemaphore) -> None:
        try:
            failed = self._retry("SQS delete", lambda: self._reader.delete(batch), SqsUnavailable)
            self.stats.delete_failures += len(failed or ())
        except Exception as exc:  # noqa: BLE001 - a task's error would otherwise vanish in the pool
            # Committed but not deleted: the messages come back and their inserts do nothing.
            logger.warning("could not delete %d committed messages (%s); they will be redelivered", len(batch), exc)
            self.stats.delete_failures += len(batch)
        finally:
            self._in_hand.remove(batch)
            slots.release()

    # -- retries ------------------------------------------------------------------------------

    def _retry(
        self,
        what: str,
        call: Callable[[], T],
        transient: type[Exception],
        give_up: Callable[[], bool] = lambda: False,
    ) -> T | None:
        """Call until it succeeds; back off exponentially (capped, with full jitter) on transient errors.

        In drain mode give up after the retry budget with ServiceLost; in follow mode never.
        Return None if `give_up()` turns true between attempts.
        """
        deadline = time.monotonic() + self._options.retry_budget_seconds
        attempt = 0
        while True:
            try:
                return call()
            except transient as exc:
                attempt += 1
                service, _, kind = what.partition(" ")
                self._observer.on_error("sqs" if service == "SQS" else "postgres", kind)
                if not self._options.follow and time.monotonic() >= deadline:
                    raise ServiceLost(f"{what} failed for {self._options.retry_budget_seconds:.0f} s: {exc}") from None
                delay = random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))
                # Log the first failure and then every tenth: a long outage must not flood the log.
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning("%s failed (attempt %d): %s; retrying", what, attempt, exc,
                                   extra={"attempt": attempt, "service": service, "error": str(exc)})
                if self._stop.is_set():
                    time.sleep(delay)
                else:
                    self._stop.wait(delay)  # a stop request cuts the wait short
                if give_up():
                    return None
