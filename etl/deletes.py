"""Deletes after the commit: the deleter threads, their bounded queue of SQS calls, and what a
delete does: call the source (through the retrier), count what was not deleted, stop tracking."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from aws.sqs import QueueUnusable, SqsUnavailable
from etl.observability import Stats
from etl.retry import Retrier
from models import ReceivedMessage

logger = logging.getLogger(__name__)


class Deleters:
    """Deletes committed messages on `threads` threads, one call per chunk, side by side, with at
    most `max_calls` calls queued or running (back-pressure on the writer: memory stays bounded).

    Each chunk: `delete` (the source's, retried by `retrier`), what it did not delete counted in
    `stats.delete_failures`, then `untrack` (the visibility keeper's), whatever happened. A delete
    refused for good (QueueUnusable: the queue deleted, DeleteMessage denied) goes to `fail`: running
    on would receive the same messages again and again, so the run stops, as after a receive.

    Daemon threads, not a ThreadPoolExecutor: a call that hangs must not hold up the end of the run
    nor the process's exit (an executor's threads are joined at interpreter exit). A chunk whose call
    has not returned by `close()`'s time limit is abandoned: counted as not deleted (its messages come
    back and are not stored twice), and its call's late end is ignored.
    """

    def __init__(
        self,
        delete: Callable[[Sequence[ReceivedMessage]], Sequence[str]],
        retrier: Retrier,
        *,
        untrack: Callable[[Sequence[ReceivedMessage]], None],
        stats: Stats,
        fail: Callable[[BaseException], None],
        threads: int,
        max_calls: int,
    ) -> None:
        self._delete = delete
        self._retrier = retrier
        self._untrack = untrack
        self._stats = stats
        self._fail = fail
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
                not_deleted = self._delete_chunk(chunk)
            finally:
                self._slots.release()
            with self._idle:  # reported before close() can see the chunk gone
                if self._outstanding.pop(key, None) is None:
                    continue  # abandoned by close(): already reported
                self._done(chunk, not_deleted)
                self._idle.notify_all()

    def _delete_chunk(self, chunk: Sequence[ReceivedMessage]) -> int:
        """Delete one chunk of committed messages; return how many were not deleted."""
        try:
            return len(self._retrier.call("SQS", "delete", lambda: self._delete(chunk), SqsUnavailable))
        except QueueUnusable as exc:
            self._fail(exc)
        except Exception as exc:  # noqa: BLE001 - given up (RetryError) or unexpected: must not end the thread
            # Committed but not deleted: the messages come back and their inserts do nothing.
            logger.warning("could not delete %d committed messages (%s); they will be redelivered", len(chunk), exc)
        return len(chunk)

    def _done(self, chunk: Sequence[ReceivedMessage], not_deleted: int) -> None:
        """Once per chunk: count what was not deleted; stop tracking it either way."""
        if not_deleted:
            self._stats.add(delete_failures=not_deleted)
        self._untrack(chunk)
