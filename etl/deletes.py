"""Deletes after the commit: the deleter threads and their bounded queue of SQS calls."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from models import ReceivedMessage

logger = logging.getLogger(__name__)

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
