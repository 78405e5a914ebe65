"""The consume loop: receive -> parse and mask -> one transaction -> delete. Orchestration only.

Ordering (the promise "no message lost, none stored twice"):

1. Receiver threads long-poll the source, parse and mask what they received (transform.py), and
   hand it to a bounded inbox (back-pressure: when the database is slower than the queue,
   receivers wait instead of buffering without limit).
2. The writer gathers received messages into a batch, flushed by size or by the age of its
   oldest message; writes logins and rejections in ONE transaction; and only after the commit
   hands the batch to the deleters.
3. Deletes of batch k run while batch k+1 is received and written. A crash anywhere before a
   delete leaves the message in the queue; it comes back and is not stored again (the unique
   `message_id`; see database/sqs_postgres.py).

Stopping: receivers stop at once; the batch in hand is still committed and deleted, retried for at
most the stop timeout (then `Stopped`: nothing uncommitted was deleted). Every retry goes through
one `Retrier` (retry.py); the in-hand visibility through one `VisibilityKeeper` (aws/visibility.py).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from aws.sqs import QueueUnusable, SqsUnavailable
from aws.visibility import MAX_ENTRIES_PER_CALL, ExtendResult, VisibilityKeeper
from config import PipelineOptions
from database.sqs_postgres import DatabaseRejectedRows, DatabaseUnavailable
from models import BatchSink, MessageSource, ReceivedMessage, WriteResult
from observability import Observer, Stats
from pii.masking import Masker
from retry import (
    Abandoned,
    Backoff,
    BudgetExhausted,
    Clock,
    Retrier,
    RetryError,
    StopDeadlinePassed,
    StopState,
)
from transform import Batch, Prepared, RecentQuarantine, prepare

logger = logging.getLogger(__name__)

_METRIC_SERVICE = {"SQS": "sqs", "PostgreSQL": "postgres"}


class ServiceLost(Exception):
    """Raised when SQS or PostgreSQL stayed unreachable beyond the retry budget (drain mode)."""


class Stopped(Exception):
    """Raised when a stop's timeout passed before the batch in hand could be committed."""

    def __init__(self, uncommitted: int, reason: str) -> None:
        super().__init__(f"{uncommitted} messages left uncommitted ({reason})")
        self.uncommitted = uncommitted


class QueueLost(Exception):
    """Raised when the queue became unusable mid-run (deleted, access denied): not retried."""


def write_batch(sink: BatchSink, batch: Batch, quarantined: RecentQuarantine) -> WriteResult:
    """Write a batch's rows and rejections in one transaction (the sink's `write`), with the
    one-table check whenever a message of it may have been seen before."""
    return sink.write(
        list(batch.rows.values()),
        list(batch.rejections.values()),
        redelivered=batch.redelivered > 0 or quarantined.holds_any(batch.rows),
    )


def store(batch: Batch, masker: Masker, write: Callable[[], WriteResult]) -> WriteResult:
    """Commit `batch` with `write` (one transaction); rows PostgreSQL refuses alone are quarantined
    and the rest written again, so a batch never fails because of one row.

    The one path from a prepared batch to the database, for the consume loop and for the Lambda
    handler (lambda_handler.py). Raises what `write` raises other than DatabaseRejectedRows.
    """
    while True:
        try:
            return write()
        except DatabaseRejectedRows as exc:
            # Rare: validation let through something PostgreSQL refuses. Quarantine those rows
            # alone and write the rest; the batch around them must not fail.
            batch.quarantine_refused(exc.bad_logins, exc.bad_rejections, masker)


class Pipeline:
    """Runs receivers, the writer and the deleters until the queue is drained or stop() is called."""

    def __init__(
        self,
        source: MessageSource,
        sink: BatchSink,
        masker: Masker,
        options: PipelineOptions,
        observer: Observer | None = None,
        *,
        clock: Clock | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._source = source
        self._sink = sink
        self._masker = masker
        self._options = options
        self._observer = observer or Observer()
        self._stop = StopState(clock or Clock(), options.stop_timeout_seconds)
        self._retrier = Retrier(
            Backoff(options.backoff_base_seconds, options.backoff_cap_seconds),
            self._stop,
            budget_seconds=None if options.follow else options.retry_budget_seconds,
            on_error=lambda service, operation: self._observer.on_error(_METRIC_SERVICE[service], operation),
            rng=rng,
        )
        self.keeper = VisibilityKeeper(
            source.change_visibility, options.visibility_timeout_seconds, on_pass=self._extended
        )
        self._inbox: queue.Queue[Prepared | None] = queue.Queue(maxsize=max(4, 2 * options.batch_size // 10))
        self._fatal: BaseException | None = None
        self._quarantined = RecentQuarantine()
        self.stats = Stats()

    @property
    def stopping(self) -> bool:
        """True once stop() was called."""
        return self._stop.stopping

    def stop(self) -> None:
        """Stop receiving; the batch in hand is still committed and deleted (within the stop timeout)."""
        self._stop.stop()

    def run(self) -> Stats:
        """Consume until drained (or stopped); return the counters.

        Raises ServiceLost (drain mode, a service gone beyond the retry budget), Stopped (the stop
        timeout passed with messages uncommitted) or QueueLost. The work runs in other threads; the
        calling (main) thread only waits, so that signal handlers run at once even while a commit
        blocks inside libpq.
        """
        worker = threading.Thread(target=self._work, name="writer", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
        if isinstance(self._fatal, BudgetExhausted):
            raise ServiceLost(str(self._fatal)) from None
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _work(self) -> None:
        try:
            receivers = [
                threading.Thread(target=self._receive_loop, name=f"receiver-{i}", daemon=True)
                for i in range(self._options.receivers)
            ]
            for thread in receivers:
                thread.start()
            self.keeper.start()
            deleters = ThreadPoolExecutor(max_workers=self._options.deleters, thread_name_prefix="deleter")
            try:
                self._write_loop(deleters)
            finally:
                self._stop.stop()  # deletes still running are now bounded by the stop deadline
                deleters.shutdown(wait=True)
                self.keeper.stop()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self._fatal = self._fatal or exc
        self._stop.stop()

    # -- receiving ------------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        try:
            while not self._stop.stopping:
                messages = self._retrier.call("SQS", "receive", self._source.receive, SqsUnavailable, finish=False)
                if messages:
                    redelivered = sum(1 for m in messages if m.receive_count > 1)
                    self.stats.add(received=len(messages), redelivered=redelivered)
                    self._observer.on_received(len(messages), redelivered)
                    # Blocks while the writer is behind. Never dropped, even when stopping: these
                    # messages are part of the batch that will be committed and deleted.
                    self.keeper.track(messages)
                    self._inbox.put(prepare(messages, self._masker, self._options.max_receives))
                elif not self._options.follow:
                    return  # drained: an empty long poll
        except Abandoned:
            return  # stopped while SQS was unreachable
        except QueueUnusable as exc:
            self._fail(QueueLost(str(exc)))
        except BaseException as exc:  # noqa: BLE001 - handed to the writer thread, re-raised there
            self._fail(exc)
        finally:
            self._inbox.put(None)  # this receiver is done

    def _extended(self, result: ExtendResult) -> None:
        self.stats.add(extended=result.extended)

    # -- writing --------------------------------------------------------------------------------

    def _write_loop(self, deleters: ThreadPoolExecutor) -> None:
        # At most two batches' worth of delete calls outstanding: memory stays bounded, and the
        # writer goes on with the next batch while the last calls of the previous one finish.
        slots = threading.BoundedSemaphore(max(2, 2 * self._options.batch_size // MAX_ENTRIES_PER_CALL))
        live = self._options.receivers
        parts: list[Prepared] = []
        size = 0
        oldest = 0.0
        while live:
            self._observer.on_writer_turn()
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
            if not parts:
                continue
            if size < self._options.batch_size and time.monotonic() - oldest < self._options.flush_seconds and live:
                continue
            if self._fatal is not None:
                return  # a receiver failed for good: what is in hand comes back after its timeout
            try:
                committed = self._commit(parts)
            except StopDeadlinePassed as exc:
                raise Stopped(size + self._drain_inbox(), str(exc)) from None
            parts, size = [], 0
            # Only now, after the commit: one task per DeleteMessageBatch call, side by side.
            for start in range(0, len(committed), MAX_ENTRIES_PER_CALL):
                slots.acquire()
                deleters.submit(self._delete, committed[start : start + MAX_ENTRIES_PER_CALL], slots)

    def _drain_inbox(self) -> int:
        count = 0
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return count
            count += len(item.messages) if item is not None else 0

    def _commit(self, parts: Sequence[Prepared]) -> list[ReceivedMessage]:
        """Store a batch in one transaction; return the messages that may now be deleted."""
        started = time.monotonic()
        batch = Batch(parts)
        written = store(
            batch,
            self._masker,
            lambda: self._retrier.call("PostgreSQL", "write", lambda: self._write_once(batch), DatabaseUnavailable),
        )
        self._quarantined.remember(written.rejected_ids)
        failed = batch.failed
        self.stats.add(
            loaded=written.inserted, rejected=written.rejected, duplicates=written.duplicates, failed=len(failed)
        )
        self.keeper.untrack(failed)  # not extended: they come back after the timeout
        seconds = time.monotonic() - started
        self._observer.on_commit(batch, seconds, written)
        logger.debug(
            "committed %d messages in %.0f ms: %s",
            len(batch.messages),
            seconds * 1000,
            written,
            extra={"batch_size": len(batch.messages), "duration_ms": round(seconds * 1000, 1)},
        )
        return batch.deletable()

    def _write_once(self, batch: Batch) -> WriteResult:
        if not self._sink.connected:
            self._sink.connect()  # after an outage: reconnect (the schema is checked, not relocked)
        return write_batch(self._sink, batch, self._quarantined)

    def _delete(self, chunk: Sequence[ReceivedMessage], slots: threading.BoundedSemaphore) -> None:
        try:
            refused = self._retrier.call("SQS", "delete", lambda: self._source.delete(chunk), SqsUnavailable)
            self.stats.add(delete_failures=len(refused))
        except (RetryError, Exception) as exc:  # noqa: BLE001 - a task's error would otherwise vanish
            # Committed but not deleted: the messages come back and their inserts do nothing.
            logger.warning("could not delete %d committed messages (%s); they will be redelivered", len(chunk), exc)
            self.stats.add(delete_failures=len(chunk))
        finally:
            self.keeper.untrack(chunk)
            slots.release()
