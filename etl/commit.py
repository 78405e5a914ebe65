"""A batch stored: one transaction (`write_batch`, through the sink), rows PostgreSQL refuses
quarantined and the rest written again (`store`), retried under the retrier (Committer). `store`
and `write_batch` are also the Lambda handler's path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from database.errors import DatabaseRejectedRows, DatabaseUnavailable
from etl.batch import Batch, Prepared, RecentQuarantine
from etl.retry import Retrier
from models import BatchSink, WriteResult
from pii.masking import Masker


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
        written = store(batch, self._masker, partial(self._write_retried, batch))
        # Every id the committed batch quarantined, not only the rows this write added: when an
        # earlier attempt committed and reported a failure, the retry adds nothing, and a later
        # first-delivery copy of the message must still take the one-table check.
        self._quarantined.remember(batch.rejections)
        return batch, written

    def _write_retried(self, batch: Batch) -> WriteResult:
        """One write of `batch`, retried under the retrier while PostgreSQL is unavailable."""
        return self._retrier.call("PostgreSQL", "write", partial(self._write_once, batch), DatabaseUnavailable)

    def _write_once(self, batch: Batch) -> WriteResult:
        if not self._sink.connected:
            self._sink.connect()  # after an outage: reconnect (the schema is checked, not relocked)
        return write_batch(self._sink, batch, self._quarantined)
