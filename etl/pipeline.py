"""The consume loop: receive -> parse and mask -> one transaction -> delete. Orchestration only.

Ordering (the promise "no message lost, none stored twice"):

1. Receiver threads long-poll the source, parse and mask what they received (transform.py), and
   hand it to a bounded inbox (back-pressure: receivers wait when the database is slower). The
   messages in hand are bounded by count (the inbox) and by bytes (batch.BytesInHand: a receive
   takes its share before its response is read, waiting while the bytes in hand would pass
   --max-bytes-in-hand: the response's size where the source knows it first, SQS's Content-Length,
   else 10 messages of the queue's largest size). Bodies are let go at the commit, not at the delete.
2. The writer takes batches from the inbox (batch.Batcher: cut by size or age), writes logins
   and rejections in ONE transaction (commit.Committer), and only after the commit hands the
   batch to the deleters (deletes.Deleters).
3. Deletes of batch k run while batch k+1 is received and written. A crash anywhere before a
   delete leaves the message in the queue; it comes back and is not stored again (the unique
   `message_id`; see database/sqs_postgres.py).

Stopping: receivers stop at once; the batch in hand is still committed and deleted, retried for at
most the stop timeout (then `Stopped`: nothing uncommitted was deleted). A hard bound, also when a
call hangs instead of failing: `run` waits no longer than the stop timeout plus STOP_MARGIN_SECONDS
(retry.py), then ends, abandoning the calls in flight on their daemon threads (a commit landing
later is harmless: its messages were not deleted, come back, and are not stored twice). Every retry
goes through one `Retrier`; the in-hand visibility through one `VisibilityKeeper` (aws/visibility.py).
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence

from aws.limits import BATCH_LIMIT, chunks
from aws.sqs import QueueUnusable, SqsUnavailable
from aws.visibility import ExtendResult, VisibilityKeeper
from config import PipelineOptions
from etl.batch import Batcher, BytesInHand, Inbox, Prepared, prepare
from etl.commit import Committer
from etl.deletes import Deleters
from etl.observability import Observer, Stats
from etl.retry import STOP_MARGIN_SECONDS, Abandoned, BudgetExhausted, Clock, Retrier, StopDeadlinePassed, StopState
from models import Backoff, BatchSink, MessageSource, ReceivedMessage, SizedMessageSource
from pii.masking import Masker

logger = logging.getLogger(__name__)

_METRIC_SERVICE = {"SQS": "sqs", "PostgreSQL": "postgres"}
# A FIFO drain's pause after an empty receive while its own messages hold their groups back.
HELD_BACK_PAUSE_SECONDS = 0.05


class PipelineError(Exception):
    """Root of the errors the loop raises (the retrier's own: retry.RetryError)."""


class ServiceLost(PipelineError):
    """Raised when SQS or PostgreSQL stayed unreachable beyond the retry budget (drain mode)."""


class Stopped(PipelineError):
    """Raised when a stop's timeout passed before the batch in hand could be committed.

    `hung`: a call was still in flight (the writer's thread is inside it); the caller must not
    wait for that thread, nor for anything it holds (its database connection).
    """

    def __init__(self, uncommitted: int, reason: str, *, hung: bool = False) -> None:
        super().__init__(f"{uncommitted} messages left uncommitted ({reason})")
        self.uncommitted = uncommitted
        self.hung = hung


class QueueLost(PipelineError):
    """Raised when the queue became unusable mid-run (deleted, access denied): not retried."""


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
        stop_margin_seconds: float = STOP_MARGIN_SECONDS,
    ) -> None:
        self._source = source
        self._masker = masker
        self._options = options
        self._observer = observer or Observer()
        self._stop = StopState(clock or Clock(), options.stop_timeout_seconds, stop_margin_seconds)
        self._retrier = Retrier(
            Backoff(options.backoff_base_seconds, options.backoff_cap_seconds),
            self._stop,
            budget_seconds=None if options.follow else options.retry_budget_seconds,
            on_error=lambda service, operation: self._observer.on_error(_METRIC_SERVICE[service], operation),
            rng=rng,
        )
        self._committer = Committer(sink, masker, self._retrier)
        # The keeper reads the same clock as the retries: a test's virtual clock moves both.
        self.keeper = VisibilityKeeper(
            source.change_visibility,
            options.visibility_timeout_seconds,
            clock=self._stop.clock.now,
            on_pass=self._extended,
        )
        self._inbox = Inbox(maxsize=max(4, 2 * options.batch_size // 10))
        self.in_hand = BytesInHand(options.max_bytes_in_hand, BATCH_LIMIT * options.max_message_bytes)
        self._batcher = Batcher(
            self._inbox, options, batch_bytes=self.in_hand.batch_bytes, on_turn=self._observer.on_writer_turn
        )
        # At most two batches' worth of delete calls outstanding: memory stays bounded, and the
        # writer goes on with the next batch while the last calls of the previous one finish.
        max_calls = max(2, 2 * options.batch_size // BATCH_LIMIT)
        self.stats = Stats()
        self._deleters = Deleters(
            source.delete,
            self._retrier,
            untrack=self.keeper.untrack,
            stats=self.stats,
            fail=self._fail,
            threads=options.deleters,
            max_calls=max_calls,
        )
        self._fatal: BaseException | None = None
        self._lock = threading.Lock()
        self._uncommitted = 0  # received and not yet committed (nor given up as failed)
        self._committing = False

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
        calling (main) thread only waits, in short steps, so that signal handlers run at once even
        while a commit blocks inside libpq, and so that it can stop waiting for a call that hangs.
        """
        self.keeper.start()
        self._deleters.start()
        for n in range(self._options.receivers):
            threading.Thread(target=self._receive_loop, name=f"receiver-{n}", daemon=True).start()
        writer = threading.Thread(target=self._write_loop, name="writer", daemon=True)
        writer.start()
        while writer.is_alive() and not self._stop.past_give_up():
            give_up_at = self._stop.give_up_at
            writer.join(0.2 if give_up_at is None else min(0.2, max(0.01, give_up_at - time.monotonic())))
        self._stop.stop()  # the writer's end stopped it already, unless a receiver failed first
        assert self._stop.give_up_at is not None
        self._deleters.close(self._stop.give_up_at)
        self.keeper.stop(wait_seconds=max(0.0, self._stop.give_up_at - time.monotonic()))
        bound = f"{self._stop.timeout_seconds + self._stop.margin_seconds:g} s after the stop"
        if writer.is_alive() and self._uncommitted:
            what = "a PostgreSQL call" if self._committing else "a call"
            cause = f"; after {self._fatal}" if self._fatal is not None else ""
            raise Stopped(self._uncommitted, f"{what} had not returned {bound}{cause}", hung=self._committing)
        if isinstance(self._fatal, BudgetExhausted):
            raise ServiceLost(str(self._fatal)) from None
        if isinstance(self._fatal, QueueUnusable):  # from a receive or a delete: refused for good
            raise QueueLost(str(self._fatal)) from None
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _fail(self, exc: BaseException) -> None:
        """End the run with `exc` (the first failure wins), from any of its threads."""
        self._fatal = self._fatal or exc
        self._stop.stop()

    # -- receiving ------------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        stopping = lambda: self._stop.stopping  # noqa: E731 - read at each wait
        source = self._source
        sized = source if isinstance(source, SizedMessageSource) else None
        try:
            while not self._stop.stopping:
                # Waits while the bytes in hand are at the bound (the writer releases them). A sized
                # source takes its response's size before reading it; another, the worst case first.
                claim = self.in_hand.claim(stopping)
                if sized is not None:
                    ready = self.in_hand.wait_for_room(stopping)
                    receive: Callable[[], list[ReceivedMessage]] = functools.partial(sized.receive_within, claim)
                else:
                    ready = claim.take(None)
                    receive = source.receive
                if not ready:
                    return
                prepared = None
                held_back = self._held_back()  # before the receive: its answer may reflect them
                try:
                    messages = self._retrier.call("SQS", "receive", receive, SqsUnavailable, finish=False)
                    if messages:
                        redelivered = sum(1 for m in messages if m.receive_count > 1)
                        self.stats.add(received=len(messages), redelivered=redelivered)
                        self._observer.on_received(len(messages), redelivered)
                        with self._lock:
                            self._uncommitted += len(messages)
                        self.keeper.track(messages)
                        prepared = prepare(
                            messages, self._masker, self._options.max_receives, self._options.max_body_bytes
                        )
                finally:
                    claim.settle(0 if prepared is None else prepared.nbytes)
                if prepared is not None:
                    # Blocks while the writer is behind. Never dropped, even when stopping: these
                    # messages are part of the batch that will be committed and deleted.
                    self._inbox.put(prepared)
                elif not self._options.follow:
                    if not (held_back or self._held_back()):
                        return  # drained: an empty long poll
                    self._stop.event.wait(HELD_BACK_PAUSE_SECONDS)  # a poll of 0 s must not spin
        except Abandoned:
            return  # stopped while SQS was unreachable
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() in the calling thread
            self._fail(exc)
        finally:
            self._inbox.put(None)  # this receiver is done

    def _held_back(self) -> bool:
        """On a FIFO queue, an empty receive while this process holds messages (received, not yet
        deleted) may mean only that their groups hold the next messages back: the drain goes on.
        Asked before the receive and after it (a delete may end meanwhile). A standard queue
        delivers any visible message: its empty receive ends the drain at once."""
        return self._options.fifo and len(self.keeper) > 0

    def _extended(self, result: ExtendResult) -> None:
        self.stats.add(extended=result.extended)

    # -- writing --------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            while (parts := self._batcher.take()) is not None:
                if self._fatal is not None:
                    return  # a receiver failed for good: what is in hand comes back after its timeout
                committed = self._commit(parts)
                # Only now, after the commit: one DeleteMessageBatch call per 10, side by side.
                for chunk in chunks(committed):
                    self._deleters.submit(chunk, self._stop.past_give_up)
        except StopDeadlinePassed as exc:
            self._fail(Stopped(self._uncommitted, str(exc)))
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() in the calling thread
            self._fail(exc)
        finally:
            self._stop.stop()  # deletes still running are now bounded by the stop deadline

    def _commit(self, parts: Sequence[Prepared]) -> list[ReceivedMessage]:
        """Store a batch in one transaction; return the messages that may now be deleted."""
        started = time.monotonic()
        self._committing = True
        try:
            batch, written = self._committer.commit(parts)
        finally:
            self._committing = False
        with self._lock:
            self._uncommitted -= len(batch.messages)
        # Stored (or left for redelivery): the deletes and the visibility keeper need the receipt
        # handles only. Letting the bodies go now keeps them out of the deleters' queue.
        for message in batch.messages:
            message.body = ""
        self.in_hand.release(sum(part.nbytes for part in parts))
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
