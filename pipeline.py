"""The consume loop: receive -> parse and mask -> one transaction -> delete.

Ordering (the promise "no message lost, none stored twice"):

1. Receiver threads long-poll SQS and hand messages to a bounded inbox (back-pressure: when the
   database is slower than the queue, receivers wait instead of buffering without limit).
2. The writer (the calling thread) gathers messages into a batch, flushed by size or by the age
   of its oldest message; parses and masks each one; writes logins and rejections in ONE
   transaction; and only after the commit hands the batch to the deleters.
3. Deletes of batch k run while batch k+1 is received and written. A crash anywhere before a
   delete leaves the message in the queue; it comes back and its insert does nothing
   (`ON CONFLICT (message_id) DO NOTHING`).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TypeVar

from aws.sqs import QueueNotFound, SqsReader, SqsUnavailable
from database.sqs_postgres import DatabaseRejectedRows, DatabaseUnavailable, PostgresWriter, WriteResult
from models import InvalidMessage, LoginEvent, MaskedLogin, ReceivedMessage, Rejection
from pii.masking import BODY_FIELD, Masker

logger = logging.getLogger(__name__)
T = TypeVar("T")

BACKOFF_BASE_SECONDS = 0.2
BACKOFF_CAP_SECONDS = 10.0


class ServiceLost(Exception):
    """Raised when SQS or PostgreSQL stayed unreachable beyond the retry budget (drain mode)."""


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """How the loop runs; defaults measured on a 2-core machine (see bench/)."""

    follow: bool = False
    receivers: int = 4
    batch_size: int = 1000
    flush_seconds: float = 0.5
    retry_budget_seconds: float = 60.0


@dataclass(slots=True)
class Stats:
    """Counters of one run."""

    received: int = 0
    loaded: int = 0
    rejected: int = 0
    duplicates: int = 0
    delete_failures: int = 0
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        seconds = time.monotonic() - self.started
        rate = self.received / seconds if seconds > 0 else 0.0
        return (
            f"loaded {self.loaded}, rejected {self.rejected}, duplicates skipped {self.duplicates} "
            f"in {seconds:.1f} s ({rate:.0f} msgs/s)"
        )


def transform(message: ReceivedMessage, masker: Masker) -> MaskedLogin | Rejection:
    """Parse and mask one message: a row for `user_logins`, or a Rejection with its reason."""
    try:
        event = LoginEvent.from_body(message.body)
    except InvalidMessage as exc:
        return reject(message, masker, str(exc))
    sent_at = message.sent_at or datetime.now(timezone.utc)
    return MaskedLogin(
        message_id=message.message_id,
        user_id=event.user_id,
        device_type=event.device_type,
        masked_ip=masker.mask("ip", event.ip),
        masked_device_id=masker.mask("device_id", event.device_id),
        locale=event.locale,
        app_version=event.app_version,
        create_date=sent_at.date(),
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


class Pipeline:
    """Runs receivers, the writer and the deleters until the queue is drained or stop() is called."""

    def __init__(self, reader: SqsReader, writer: PostgresWriter, masker: Masker, options: PipelineOptions) -> None:
        self._reader = reader
        self._writer = writer
        self._masker = masker
        self._options = options
        self._stop = threading.Event()
        self._inbox: queue.Queue[list[ReceivedMessage] | None] = queue.Queue(
            maxsize=max(4, 2 * options.batch_size // 10)
        )
        self._fatal: BaseException | None = None
        self.stats = Stats()

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop receiving; the batch in hand is still committed and deleted."""
        self._stop.set()

    def run(self) -> Stats:
        """Consume until drained (or stopped); return the counters."""
        receivers = [
            threading.Thread(target=self._receive_loop, name=f"receiver-{i}", daemon=True)
            for i in range(self._options.receivers)
        ]
        for thread in receivers:
            thread.start()
        with ThreadPoolExecutor(max_workers=self._options.receivers, thread_name_prefix="deleter") as deleters:
            pending: list[Future[None]] = []
            try:
                self._write_loop(deleters, pending)
            finally:
                self._stop.set()
                for future in pending:
                    future.result()
        if self._fatal is not None:
            raise self._fatal
        return self.stats

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
        self._inbox.put(messages)

    # -- writing ------------------------------------------------------------------------------

    def _write_loop(self, deleters: ThreadPoolExecutor, pending: list[Future[None]]) -> None:
        live = self._options.receivers
        batch: list[ReceivedMessage] = []
        oldest = 0.0
        while live:
            timeout = max(0.0, oldest + self._options.flush_seconds - time.monotonic()) if batch else 0.5
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = []
            if item is None:
                live -= 1
            elif item:
                if not batch:
                    oldest = time.monotonic()
                batch.extend(item)
            due = batch and (
                len(batch) >= self._options.batch_size
                or time.monotonic() - oldest >= self._options.flush_seconds
                or not live
            )
            if due:
                if self._fatal is not None:
                    return  # a receiver failed for good: do not commit what we cannot delete safely
                self._commit(batch)
                # Deletes of the previous batch had this batch's write to finish; wait for them
                # now so that at most two batches are ever in hand.
                for future in pending:
                    future.result()
                pending[:] = [deleters.submit(self._delete, batch)]
                batch = []

    def _commit(self, batch: Sequence[ReceivedMessage]) -> None:
        self.stats.received += len(batch)
        rows: dict[str, MaskedLogin] = {}
        rejections: dict[str, Rejection] = {}
        for message in batch:
            result = transform(message, self._masker)
            if isinstance(result, Rejection):
                rejections[message.message_id] = result
                logger.warning("message %s rejected: %s", message.message_id, result.reason)
            else:
                rows[message.message_id] = result  # a message received twice is written once
        by_id = {m.message_id: m for m in batch}
        while True:
            try:
                result = self._retry(
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
                    logger.warning("message %s rejected: %s", login.message_id, reason)
        self.stats.loaded += result.inserted
        self.stats.rejected += result.rejected
        self.stats.duplicates += result.duplicates
        logger.debug("committed %d messages: %s", len(batch), result)

    def _write_once(self, logins: list[MaskedLogin], rejections: list[Rejection]) -> WriteResult:
        if not self._writer.connected:
            self._writer.connect()  # after an outage: reconnect (and re-check the schema)
        return self._writer.write(logins, rejections)

    def _delete(self, batch: Sequence[ReceivedMessage]) -> None:
        try:
            failed = self._retry("SQS delete", lambda: self._reader.delete(batch), SqsUnavailable)
        except (ServiceLost, QueueNotFound) as exc:
            # Committed but not deleted: the messages come back and their inserts do nothing.
            logger.warning("could not delete %d committed messages (%s); they will be redelivered", len(batch), exc)
            self.stats.delete_failures += len(batch)
            return
        self.stats.delete_failures += len(failed or ())

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
                if not self._options.follow and time.monotonic() >= deadline:
                    raise ServiceLost(f"{what} failed for {self._options.retry_budget_seconds:.0f} s: {exc}") from None
                delay = random.uniform(0, min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt))
                # Log the first failure and then every tenth: a long outage must not flood the log.
                if attempt == 1 or attempt % 10 == 0:
                    logger.warning("%s failed (attempt %d): %s; retrying", what, attempt, exc)
                if self._stop.is_set():
                    time.sleep(delay)
                else:
                    self._stop.wait(delay)  # a stop request cuts the wait short
                if give_up():
                    return None
