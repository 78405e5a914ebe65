"""PostgresWriter: the ETL's session, idempotent batch writes of logins and rejections.

It brings the schema up to date at connect (database/schema.py), keeps the coming days'
partitions (database/partitions.py), and writes each batch in one transaction.

Idempotency: every row carries the SQS MessageId, and `user_logins` is partitioned by day on
create_date, a function of the message itself (its SentTimestamp), with a unique index on
(message_id, create_date) in each partition: a redelivered message has the same day, lands in the
same partition and is refused there. A batch is COPYed straight into the table; if the index
refuses it (a message already stored), the batch is written again through a staging table with
``ON CONFLICT (message_id, create_date) DO NOTHING``. A message redelivered after a crash between
commit and delete is therefore stored once. One transaction per batch, never per row.
Partitions: database/partitions.py and docs/partitions.md.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TypeVar

import psycopg2
import psycopg2.errors
from psycopg2.extensions import cursor as Cursor
from psycopg2.extras import execute_values

from database import key_checks, partitions, schema
from database.connection import ROW_ERRORS, close_quietly, first_line, one_row, open_connection, transaction
from database.copy_format import REJECTED_STAGE_COLUMNS, copy_data, copy_in, copy_text, rejection_copy_text
from database.errors import DatabaseError, DatabaseRejectedRows, DatabaseUnavailable, KeyMismatch, SchemaBusy
from database.schema import COLUMN_LIST, QUARANTINE_EPOCH, SCHEMA_LOCK_ID, SCHEMA_VERSION, lock_holders
from models import MaskedLogin, Rejection, WriteResult

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Any constant: the quarantine lock, taken by every write transaction (see PostgresWriter.write).
_QUARANTINE_LOCK_ID = 7_412_350_192
# The write transactions' observations of the epoch kept (a batch received before the oldest is checked).
_EPOCHS_KEPT = 64
# After a batch that held an already-stored message, this many batches go through staging.
STAGED_BATCHES_AFTER_CONFLICT = 10
# Longest wait for any lock the schema set-up needs; past it the set-up is retried with backoff.
DEFAULT_LOCK_TIMEOUT_SECONDS = 2.0
# Pages of the legacy table moved per transaction by the migration to partitions (~40,000 rows).
MIGRATE_BATCH_PAGES = 1000


class PostgresWriter:
    """Owns one connection; writes batches in single transactions."""

    def __init__(
        self,
        dsn: str,
        *,
        connect_timeout_seconds: int = 5,
        application_name: str = "login-etl",
        lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS,
        migrate_batch_pages: int = MIGRATE_BATCH_PAGES,
        key_checks: Mapping[int, str] | None = None,
    ) -> None:
        self._dsn = dsn
        # {version: check value} of the keyring whose tokens this writer writes: compared with the
        # database's at every connect, before anything is written (None: writes no tokens).
        self._key_checks = dict(key_checks) if key_checks is not None else None
        self._migrate_batch_pages = max(1, migrate_batch_pages)
        self._lock_timeout_ms = max(1, int(lock_timeout_seconds * 1000))
        self._partitions = partitions.DailyPartitions(
            lock_timeout_ms=self._lock_timeout_ms, lock_id=SCHEMA_LOCK_ID, holders=lock_holders
        )
        self._connect_timeout = connect_timeout_seconds
        self._application_name = application_name
        self._conn: psycopg2.extensions.connection | None = None
        self._staged_batches_left = 0
        # (time.monotonic(), epoch): what this writer saw of QUARANTINE_EPOCH, and when (write()).
        self._epochs: deque[tuple[float, int]] = deque(maxlen=_EPOCHS_KEPT)

    def __repr__(self) -> str:
        return "PostgresWriter()"  # the DSN may hold a password

    # -- connection ---------------------------------------------------------------------------

    def connect(
        self,
        *,
        migrate: bool = True,
        timeout_seconds: int | None = None,
        statement_timeout_seconds: float | None = None,
        register_keys: bool | None = None,
    ) -> None:
        """Open the connection and (unless told not to) bring the schema up to date; then compare the
        keyring with the database's key check values (KeyMismatch), recording the versions it does
        not know yet if `register_keys` (default: when migrating).

        `timeout_seconds` bounds this connect instead of the constructor's connect timeout, and
        `statement_timeout_seconds` (PostgreSQL's statement_timeout) each statement of the session
        (the Lambda handler derives both from the time its invocation has left). Every connection
        gets the TCP settings of connection_parameters().

        The schema is looked at first, without taking a lock; only a schema that is behind is
        migrated. Every lock a migration (or the session's staging table) waits for is bounded by
        the lock timeout: SchemaBusy then names who holds it, and the caller retries later. So a
        restart never queues behind an analyst's open transaction, nor makes the analysts'
        next queries queue behind it.
        """
        self.close()
        self._conn = open_connection(
            self._dsn,
            connect_timeout=timeout_seconds or self._connect_timeout,
            application_name=self._application_name,
            statement_timeout_seconds=statement_timeout_seconds,
        )
        register = migrate if register_keys is None else register_keys
        if not migrate:
            self._verify_keys(register=register)
            return
        try:
            version = self.schema_version()
            if version is not None and version > SCHEMA_VERSION:
                # A newer release migrated this database (a rolling update in progress, or a
                # rollback): its additive schema serves this release too, and migrating "back"
                # would replace its views with ours.
                logger.warning(
                    "schema version %d is newer than this release's %d: not migrating", version, SCHEMA_VERSION
                )
            elif self.schema_problem() is not None:
                schema.migrate(
                    self._session(), lock_timeout_ms=self._lock_timeout_ms, legacy_batch_pages=self._migrate_batch_pages
                )
            self._partitions.ensure(self._run, partitions.utc_today())
            self._run(partial(schema.create_stage, lock_timeout_ms=self._lock_timeout_ms))
            self._run(self._observe_epoch, commit=False)
            self._verify_keys(register=register)
        except psycopg2.errors.LockNotAvailable:
            holders = self._run(lock_holders, commit=False)
            self.close()
            raise SchemaBusy(
                f"schema set-up waited {self._lock_timeout_ms} ms for a lock {holders}; it will try again"
            ) from None

    def _verify_keys(self, *, register: bool) -> None:
        """Refuse a keyring that holds a version the database records with another key (KeyMismatch,
        the connection closed: the next connect checks again); record the versions not yet known."""
        if self._key_checks is None:
            return
        held = self._key_checks

        def verify(cur: Cursor) -> list[int] | str:
            try:
                return key_checks.verify(cur, held, register=register)
            except psycopg2.errors.InsufficientPrivilege as exc:  # a role that may not write tokens either
                return first_line(exc)

        wrong = self._run(verify, commit=register)
        if isinstance(wrong, str):
            self.close()
            raise DatabaseError(f"cannot compare the keyring with the database's key check values: {wrong}")
        if wrong:
            self.close()
            raise KeyMismatch(key_checks.mismatch_message(wrong))

    def recorded_key_checks(self) -> dict[int, str]:
        """``{version: check value}`` as the database records them ({} before schema 6; changes nothing)."""
        return self._run(key_checks.recorded, commit=False)

    def schema_version(self) -> int | None:
        """The schema's version, or None if its tables are not there yet (changes nothing)."""
        return self._run(schema.schema_version, commit=False)

    def schema_problem(self) -> str | None:
        """Without changing anything: None if the schema is current, else what is wrong."""
        return self._run(schema.schema_problem, commit=False)

    def closed_partitions_unindexed(self) -> int:
        """How many closed partitions (before today, UTC, or the default) lack a token index (changes nothing)."""

        def inspect(cur: Cursor) -> int:
            return len({leaf for leaf, _name in partitions.missing_token_indexes(cur, partitions.utc_today())})

        return self._run(inspect, commit=False)

    @property
    def connected(self) -> bool:
        """True while the connection is open (it may still fail on next use)."""
        return self._conn is not None and not self._conn.closed

    def close(self) -> None:
        """Close the connection if open; never raises."""
        if self._conn is not None:
            close_quietly(self._conn)
            self._conn = None

    # -- writes -------------------------------------------------------------------------------

    def write(
        self,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        *,
        redelivered: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        """Store a batch in one transaction; return once it has committed.

        A message is stored in one of the two tables, never both, whichever consumers write it: a
        rejection is not stored for a message already loaded, nor a login for one already
        quarantined. Only a message delivered more than once can be in either, and one side of such
        a pair holds a redelivered copy: `redelivered` (the batch holds messages received before),
        or a rejection whose receive count is above 1. Those transactions take the quarantine lock
        exclusively, every other one shares it, so the two sides of a pair never run at once and
        the later one's NOT EXISTS sees the earlier one's rows. A transaction that quarantines a
        redelivered message also bumps QUARANTINE_EPOCH. A batch of first deliveries, the common
        case, is COPYed straight into user_logins, with no look at the quarantine, only when the
        epoch is what this writer saw before the batch's first receive (`received_since`, a
        time.monotonic() from before the receive call; 0.0: unknown): a copy quarantined since then
        sends it through the staged INSERT, which looks.

        Raises DatabaseUnavailable (nothing committed; retry the batch) or DatabaseRejectedRows
        (nothing committed; the listed rows are refused by PostgreSQL, the rest are good).
        """
        self._partitions.ensure_daily(self._run)
        if logins and self._partitions.days:
            outside = sum(1 for row in logins if row.create_date not in self._partitions.days)
            if outside:
                logger.warning(
                    "%d row(s) of this batch are dated outside the daily partitions (a SentTimestamp "
                    "far off, or none); stored in %s",
                    outside,
                    partitions.DEFAULT_PARTITION,
                    extra={"count": outside},
                )
        try:
            return self._run(
                lambda cur: self._write(cur, logins, rejections, staged=redelivered, received_since=received_since)
            )
        except ROW_ERRORS as exc:
            bad_logins = [(row, why) for row in logins if (why := self._refusal(logins=[row], rejections=[]))]
            bad_rejections = [(row, why) for row in rejections if (why := self._refusal(logins=[], rejections=[row]))]
            if not bad_logins and not bad_rejections:  # no row fails alone: not the data's fault
                raise DatabaseUnavailable(f"batch refused: {exc.pgcode}") from None
            raise DatabaseRejectedRows(bad_logins, bad_rejections) from None

    def _write(
        self,
        cur: Cursor,
        logins: Sequence[MaskedLogin],
        rejections: Sequence[Rejection],
        staged: bool = False,
        received_since: float = 0.0,
    ) -> WriteResult:
        quarantines_redelivered = any(r.receive_count > 1 for r in rejections)
        exclusive = staged or quarantines_redelivered
        inserted: int | None = None
        data = copy_data(cur, copy_text(logins)) if logins else b""  # once, for either COPY
        if logins and not exclusive and not self._staged_batches_left:
            expected = self._epoch_before(received_since)
            if expected is not None:
                inserted = self._copy_straight(cur, data, len(logins), expected)
        if inserted is None:
            self._lock_quarantine(cur, exclusive=exclusive, bump=quarantines_redelivered)
            inserted = self._insert_staged(cur, data) if logins else 0
        # Not for a message already loaded. Its login row is in the partition of its day: with the
        # sent time known, one index probe there; without it (rare), one in each partition.
        stored = _insert_rejections(cur, rejections) if rejections else []
        rejected = len(stored)
        duplicates = len(logins) + len(rejections) - inserted - rejected
        return WriteResult(inserted=inserted, rejected=rejected, duplicates=duplicates, rejected_ids=frozenset(stored))

    def _lock_quarantine(self, cur: Cursor, *, exclusive: bool, bump: bool) -> int:
        """Take the quarantine lock for this transaction (write()) and return the epoch: bumped
        if `bump`, else read and remembered with the time it was read."""
        lock = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        read = f"SELECT nextval('{QUARANTINE_EPOCH}')" if bump else _READ_EPOCH
        # Two statements in one round trip; the second runs once the first holds the lock.
        cur.execute(f"SELECT {lock}(%s); {read}", (_QUARANTINE_LOCK_ID,))
        epoch = int(one_row(cur)[0])
        if not bump:
            self._epochs.append((time.monotonic(), epoch))
        return epoch

    def _observe_epoch(self, cur: Cursor) -> None:
        """Read the epoch at connect (no lock: a sequence's value is read as it is now)."""
        cur.execute(_READ_EPOCH)
        self._epochs.append((time.monotonic(), int(one_row(cur)[0])))

    def _epoch_before(self, moment: float) -> int | None:
        """The epoch this writer read last before `moment` (None: it read none before)."""
        for seen_at, epoch in reversed(self._epochs):
            if seen_at < moment:
                return epoch
        return None

    def _copy_straight(self, cur: Cursor, data: bytes, count: int, expected: int) -> int | None:
        """COPY a batch of `count` first deliveries (`data`: their COPY text) straight into
        user_logins, the fastest write (one statement, each row written once, no look at the
        quarantine); None when it may not go straight, with the transaction rolled back (it held
        nothing else: logins are written first).

        One round trip: the quarantine lock (shared), then a check that the epoch is still
        `expected` (read before the batch's first receive: no redelivered copy quarantined since,
        and none can be while the lock is held), then the COPY. It may not go straight if the epoch
        moved, or if a row is stored already (a redelivery: the unique constraint refuses the COPY;
        this and the next batches go staged, redeliveries come in runs).
        """
        check = _CHECK_EPOCH.replace("{expected}", str(int(expected)))
        try:
            copy_in(
                cur,
                f"SELECT pg_advisory_xact_lock_shared({_QUARANTINE_LOCK_ID}); {check}; "
                f"COPY user_logins ({COLUMN_LIST}) FROM STDIN",
                data,
            )
            return count
        except psycopg2.errors.RaiseException as exc:
            if _EPOCH_MOVED not in str(exc):
                raise
        except psycopg2.errors.UniqueViolation:
            self._staged_batches_left = STAGED_BATCHES_AFTER_CONFLICT
        cur.connection.rollback()  # which let the quarantine lock go: write() takes it again
        return None

    def _insert_staged(self, cur: Cursor, data: bytes) -> int:
        """Insert the rows that are new and not quarantined, through the session's staging table and
        ``ON CONFLICT DO NOTHING``; return how many."""
        if self._staged_batches_left:
            self._staged_batches_left -= 1
        copy_in(cur, f"COPY user_logins_stage ({COLUMN_LIST}) FROM STDIN", data)
        cur.execute(_STAGED_LOGIN_INSERT)
        return cur.rowcount

    def _refusal(self, *, logins: Sequence[MaskedLogin], rejections: Sequence[Rejection]) -> str | None:
        """Why PostgreSQL refuses these rows written alone (rolled back either way), or None."""
        try:
            self._run(partial(self._write, logins=logins, rejections=rejections), commit=False)
        except ROW_ERRORS as exc:
            return f"refused by PostgreSQL: {exc.pgcode} {first_line(exc).split(':')[0]}"
        return None

    def _session(self) -> psycopg2.extensions.connection:
        if self._conn is None or self._conn.closed:
            raise DatabaseUnavailable("not connected")
        return self._conn

    def _run(self, work: Callable[[Cursor], T], *, commit: bool = True) -> T:
        """Run `work(cursor)` in one transaction (connection.transaction: a lost connection is
        DatabaseUnavailable, and closed)."""
        return transaction(self._session(), work, commit=commit)


def _insert_rejections(cur: Cursor, rejections: Sequence[Rejection]) -> list[str]:
    """Insert quarantine rows, but none whose message is loaded already; return the message ids stored.

    The usual batch holds a few (a malformed message now and then): one INSERT … VALUES statement,
    one round trip. A flood (more than VALUES_MAX_ROWS, or VALUES_MAX_BYTES of encrypted bodies) is
    written like the logins: one COPY into the session's staging table (emptied at commit), then
    one INSERT … SELECT per kind of row. Either way a known day probes the partition of that day
    only, an unknown one every partition, and the ids come back by RETURNING (a rowcount would not
    say which). A row PostgreSQL refuses fails the statement, and write()'s fallback names it.
    """
    if len(rejections) <= VALUES_MAX_ROWS and sum(len(r.encrypted_body) for r in rejections) <= VALUES_MAX_BYTES:
        rows = [
            (r.message_id, r.reason, r.sent_at, r.receive_count, r.encrypted_body, r.create_date) for r in rejections
        ]
        return [row[0] for row in execute_values(cur, _QUARANTINE_VALUES_INSERT, rows, _VALUES_ROW, len(rows), True)]
    data = copy_data(cur, rejection_copy_text(rejections))
    copy_in(cur, f"COPY user_logins_rejected_stage ({REJECTED_STAGE_COLUMNS}) FROM STDIN", data)
    stored: list[str] = []
    for kind, insert in _QUARANTINE_INSERTS.items():
        if any((r.sent_at is not None) == (kind == "dated") for r in rejections):
            cur.execute(insert)
            stored += [row[0] for row in cur.fetchall()]
    return stored


# The NOT EXISTS probes below end in OFFSET 0, which keeps each a subquery run per staged row (an
# index probe of the unique key, in the one partition of the row's day) instead of a join the
# planner chooses blind: it has no statistics of the session's staging table, guesses hundreds of
# rows, and hashed the whole day's partition for every batch that held one rejection (90 ms at
# 100,000 rows, growing with the day). tests/integration/test_write_plans.py reads the plans.
_QUARANTINE_INSERTS = {
    kind: f"""INSERT INTO user_logins_rejected (message_id, reason, sent_at, receive_count, encrypted_body)
              SELECT s.message_id, s.reason, s.sent_at, s.receive_count, s.encrypted_body
                FROM user_logins_rejected_stage s
               WHERE {where} AND NOT EXISTS (SELECT 1 FROM user_logins l WHERE {loaded} OFFSET 0)
              ON CONFLICT (message_id) DO NOTHING RETURNING message_id"""
    for kind, where, loaded in (
        ("dated", "s.day IS NOT NULL", "l.message_id = s.message_id AND l.create_date = s.day"),
        ("undated", "s.day IS NULL", "l.message_id = s.message_id"),
    )
}
# A few quarantine rows in one statement (_insert_rejections): the VALUES list typed by its first
# row's casts; CASE evaluates only the probe of the row's kind.
VALUES_MAX_ROWS = 100
VALUES_MAX_BYTES = 256 * 1024
_VALUES_ROW = "(%s, %s, %s::timestamptz, %s::integer, %s, %s::date)"
_QUARANTINE_VALUES_INSERT = """
    INSERT INTO user_logins_rejected (message_id, reason, sent_at, receive_count, encrypted_body)
    SELECT v.message_id, v.reason, v.sent_at, v.receive_count, v.encrypted_body
      FROM (VALUES %s) AS v (message_id, reason, sent_at, receive_count, encrypted_body, day)
     WHERE CASE WHEN v.day IS NULL
                THEN NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id = v.message_id OFFSET 0)
                ELSE NOT EXISTS (SELECT 1 FROM user_logins l
                                  WHERE l.message_id = v.message_id AND l.create_date = v.day OFFSET 0)
           END
    ON CONFLICT (message_id) DO NOTHING RETURNING message_id"""
# A login not quarantined already (probed per row, as above), nor stored already.
_STAGED_LOGIN_INSERT = f"""INSERT INTO user_logins ({COLUMN_LIST}) SELECT {COLUMN_LIST} FROM user_logins_stage s
    WHERE NOT EXISTS (SELECT 1 FROM user_logins_rejected r WHERE r.message_id = s.message_id OFFSET 0)
    ON CONFLICT (message_id, create_date) DO NOTHING"""


_READ_EPOCH = f"SELECT coalesce(pg_sequence_last_value('{QUARANTINE_EPOCH}'), 0)"
# The straight COPY's check, run once the lock is held: the epoch moved since it was read, the batch
# goes staged. A DO block, not a function: no schema change, and nothing it calls can be planted.
_EPOCH_MOVED = "login-etl: the quarantine epoch moved"
_CHECK_EPOCH = (
    "DO $check$ BEGIN IF coalesce(pg_catalog.pg_sequence_last_value("
    f"'{QUARANTINE_EPOCH}'::pg_catalog.regclass), 0) <> {{expected}} "
    f"THEN RAISE EXCEPTION '{_EPOCH_MOVED}'; END IF; END $check$"
)
