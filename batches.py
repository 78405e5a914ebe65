"""A batch's way through the consume loop, apart from the orchestration (pipeline.py): the bytes in
hand bounded (BytesInHand), gathered from the receivers' inbox (Batcher), stored in one
transaction (Committer; store and write_batch are also the Lambda handler's path), and, after its
commit, deleted (Deleters).

A module of its own, at the top level: store() joins transform.Batch, the masker and the database's
errors, which no package may (aws/, pii/ and database/ never import each other), and transform.py
would pass the ~250 lines a module of the loop may have.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from config import PipelineOptions
from database.errors import DatabaseRejectedRows, DatabaseUnavailable
from models import BatchSink, ReceivedMessage, WriteResult
from pii.masking import Masker
from retry import Retrier
from transform import Batch, Prepared, RecentQuarantine

logger = logging.getLogger(__name__)

# How long the writer waits on an empty inbox before it looks around again (the liveness turn).
IDLE_WAIT_SECONDS = 0.5


def write_batch(sink: BatchSink, batch: Batch, quarantined: RecentQuarantine) -> WriteResult:
    """Write a batch's rows and rejections in one transaction (the sink's `write`), with the
    one-table check whenever a message of it may have been seen before (here, or by another
    consumer since the batch's first receive: the sink tells by `received_since`)."""
    return sink.write(
        list(batch.rows.values()),
        list(batch.rejections.values()),
        redelivered=batch.redelivered > 0 or quarantined.holds_any(batch.rows),
        received_since=min((m.received_at for m in batch.messages), default=0.0),
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


class Committer:
    """Stores batches through `sink`, one transaction each, retried under `retrier` (reconnecting
    after an outage); remembers what it quarantined, for the one-table check of later batches."""

    def __init__(self, sink: BatchSink, masker: Masker, retrier: Retrier) -> None:
        self._sink = sink
        self._masker = masker
        self._retrier = retrier
        self._quarantined = RecentQuarantine()

    def commit(self, parts: Sequence[Prepared]) -> tuple[Batch, WriteResult]:
        """Store one batch; raise what the retrier raises when it gives up (nothing committed)."""
        batch = Batch(parts)
        written = store(
            batch,
            self._masker,
            lambda: self._retrier.call("PostgreSQL", "write", lambda: self._write_once(batch), DatabaseUnavailable),
        )
        # Every id the committed batch quarantined, not only the rows this write added: when an
        # earlier attempt committed and reported a failure, the retry adds nothing, and a later
        # first-delivery copy of the message must still take the one-table check.
        self._quarantined.remember(batch.rejections)
        return batch, written

    def _write_once(self, batch: Batch) -> WriteResult:
        if not self._sink.connected:
            self._sink.connect()  # after an outage: reconnect (the schema is checked, not relocked)
        return write_batch(self._sink, batch, self._quarantined)


class BytesInHand:
    """The bytes of the messages in hand, bounded: what receivers got and the writer has not yet
    committed, plus each receive in flight counted at its worst (`per_receive`: SQS may return 10
    messages of the queue's largest size, and nothing asks it for fewer bytes).

    A receiver `reserve`s that worst case before it receives, waiting while it would pass `limit`
    (back-pressure: the writer is behind, or large bodies are in hand), then `settle`s the
    reservation to what it actually holds; the writer `release`s a batch's bytes once it has
    committed. So the bytes in hand never pass `limit`, whatever the bodies' sizes.
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
        """Bytes held or reserved now."""
        return self._held

    def reserve(self, stopping: Callable[[], bool]) -> bool:
        """Wait for room for one receive and take it; False (nothing taken) once `stopping()`."""
        with self._changed:
            while self._held + self.per_receive > self.limit:
                if stopping():
                    return False
                self._changed.wait(0.1)
            self._held += self.per_receive
            return True

    def settle(self, nbytes: int) -> None:
        """A receive returned: its reservation becomes the `nbytes` it holds (0 if none)."""
        self.release(self.per_receive - nbytes)

    def release(self, nbytes: int) -> None:
        """`nbytes` are no longer in hand (committed, or never received)."""
        with self._changed:
            self._held -= nbytes
            # Wake only the receivers the room fits (each wakes, reserves, and goes): waking them
            # all at every receive's settle cost more CPU than the receives of a fast queue.
            room = (self.limit - self._held) // self.per_receive
            if room > 0:
                self._changed.notify(room)


class Batcher:
    """Gathers the receivers' prepared messages into batches: a batch is cut when it holds
    `batch_size` messages or `batch_bytes` bytes (BytesInHand.batch_bytes), when its oldest message
    is `flush_seconds` old, or when every one of `receivers` has finished (each puts None into the
    inbox when it ends)."""

    def __init__(
        self,
        inbox: queue.Queue[Prepared | None],
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
            if self._parts:
                timeout = max(0.0, self._oldest + self._flush_seconds - time.monotonic())
            else:
                timeout = IDLE_WAIT_SECONDS
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                pass  # the oldest message's age may have come due
            else:
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


# delete(chunk) -> how many of its messages were not deleted; done(chunk, not_deleted), once per chunk.
Delete = Callable[[Sequence[ReceivedMessage]], int]
Done = Callable[[Sequence[ReceivedMessage], int], None]


class Deleters:
    """Deletes committed messages on `threads` threads, one call per chunk, side by side, with at
    most `max_calls` calls queued or running (back-pressure on the writer: memory stays bounded).

    Daemon threads, not a ThreadPoolExecutor: a call that hangs must not hold up the end of the run
    nor the process's exit (an executor's threads are joined at interpreter exit). A chunk whose call
    has not returned by `close()`'s time limit is abandoned: reported to `done` as not deleted (its
    messages come back and are not stored twice), and its call's late end is ignored.
    """

    def __init__(self, delete: Delete, done: Done, *, threads: int, max_calls: int) -> None:
        self._delete = delete
        self._done = done
        self._tasks: queue.Queue[tuple[int, Sequence[ReceivedMessage]] | None] = queue.Queue()
        self._slots = threading.BoundedSemaphore(max_calls)
        self._outstanding: dict[int, Sequence[ReceivedMessage]] = {}
        self._idle = threading.Condition()
        self._next_key = 0
        self._closed = False
        self._abandoned = 0
        self._threads = [threading.Thread(target=self._loop, name=f"deleter-{n}", daemon=True) for n in range(threads)]

    def start(self) -> None:
        """Start the delete threads."""
        for thread in self._threads:
            thread.start()

    def submit(self, chunk: Sequence[ReceivedMessage], give_up: Callable[[], bool]) -> None:
        """Queue one delete call; wait for a free slot, unless `give_up()` turns true meanwhile (then
        the chunk is abandoned at once)."""
        while not self._slots.acquire(timeout=0.1):
            if give_up():
                break
        else:
            with self._idle:
                if not self._closed:
                    key = self._next_key
                    self._next_key += 1
                    self._outstanding[key] = chunk
                    self._tasks.put((key, chunk))
                    return
        with self._idle:
            self._abandoned += len(chunk)
        self._done(chunk, len(chunk))

    def close(self, give_up_at: float) -> int:
        """Let the calls outstanding finish until `give_up_at` (time.monotonic()); abandon the rest;
        end the threads. Return how many messages were abandoned (here or in submit)."""
        for _ in self._threads:
            self._tasks.put(None)
        with self._idle:
            self._idle.wait_for(lambda: not self._outstanding, timeout=max(0.0, give_up_at - time.monotonic()))
            self._closed = True
            abandoned = list(self._outstanding.values())
            self._outstanding.clear()
            self._abandoned += sum(len(chunk) for chunk in abandoned)
        for chunk in abandoned:
            self._done(chunk, len(chunk))
        if self._abandoned:
            logger.warning(
                "abandoned the deletes of %d committed messages (a DeleteMessageBatch call had not returned "
                "by the stop's time limit); they will be redelivered and not stored twice",
                self._abandoned,
            )
        return self._abandoned

    def _loop(self) -> None:
        while (task := self._tasks.get()) is not None:
            key, chunk = task
            try:
                not_deleted = self._delete(chunk)
            except Exception:  # noqa: BLE001 - `delete` handles its errors; a bug must not end the thread
                logger.exception("delete of %d committed messages failed; they will be redelivered", len(chunk))
                not_deleted = len(chunk)
            finally:
                self._slots.release()
            with self._idle:  # reported before close() can see the chunk gone
                if self._outstanding.pop(key, None) is None:
                    continue  # abandoned by close(): already reported
                self._done(chunk, not_deleted)
                self._idle.notify_all()
