"""PostgresWriter: schema migrations, idempotent batch writes of logins and rejections.

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

import io
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date
from functools import partial
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor
from psycopg2.extensions import make_dsn, parse_dsn

from database import key_checks, partitions
from models import Backoff, MaskedLogin, Rejection, WriteResult

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Any constant: serialises schema set-up between processes starting at once.
_SCHEMA_LOCK_ID = 7_412_350_191
# Any constant: the quarantine lock, taken by every write transaction (see PostgresWriter.write).
_QUARANTINE_LOCK_ID = 7_412_350_192
# Bumped by every transaction that quarantines a redelivered message; read by the others.
QUARANTINE_EPOCH = "etl_quarantine_epoch"
# The write transactions' observations of the epoch kept (a batch received before the oldest is checked).
_EPOCHS_KEPT = 64
SCHEMA_VERSION = 8  # 1: tables and message_id; 2: the user_login_duplicates view; 3: daily partitions,
# replay columns and the user_logins_replayed view; 4: the token indexes for the analysts' queries (on
# the parent); 5: the all-time snapshot of the duplicates view (database/snapshot.py refreshes it), and
# the token indexes on closed days only (database/token_indexes.py builds them); 6: etl_key_checks, the
# check value of each key version (database/key_checks.py); 7: the network token
# column masked_network, in the duplicates view (field 'network') and a third token index of closed days;
# 8: the sequence etl_quarantine_epoch (a message in one table across consumers: PostgresWriter.write)

# COPY order: the two nullable values, `locale` and `masked_network`, last, so a row is built with one join.
_LOGIN_COLUMNS = (
    "message_id",
    "user_id",
    "device_type",
    "masked_ip",
    "masked_device_id",
    "app_version",
    "create_date",
    "locale",
    "masked_network",
)
_COLUMN_LIST = ", ".join(_LOGIN_COLUMNS)
# After a batch that held an already-stored message, this many batches go through staging.
STAGED_BATCHES_AFTER_CONFLICT = 10
# Longest wait for any lock the schema set-up needs; past it the set-up is retried with backoff.
DEFAULT_LOCK_TIMEOUT_SECONDS = 2.0
# Pages of the legacy table moved per transaction by the migration to partitions (~40,000 rows).
MIGRATE_BATCH_PAGES = 1000
# After a failed attempt to create the coming days' partitions (a lock held), the next one waits
# as the backoff policy says, but with its cap raised to at least this: each attempt queues the
# analysts' queries on user_logins for up to the lock timeout, and the days are made 7 days ahead.
PARTITION_RETRY_CAP_SECONDS = 60.0

# libpq's TCP settings for every connection, each unless DATABASE_URL sets it (a libpq keyword:
# `?tcp_user_timeout=20000&keepalives_idle=30`). Without them a call over a half-open connection (a
# black-holed server, a NAT or firewall that forgot the connection, a failover) waits for the
# kernel's retransmissions, ~15 minutes (tcp_retries2), or for ever on an idle wait. With them it
# fails within ~8 s (DatabaseUnavailable) and is retried on a new connection.
# tcp_user_timeout: data unacknowledged (or keepalive probes unanswered) this long ends the
# connection; 8 s keeps a stop (--stop-timeout 20 s) plus one hung call inside the 30 s grace of
# Compose and Kubernetes. It can also end a COPY the server stopped reading for that long (a lock
# waited for mid-COPY): the batch is then retried. libpq 12 or later (older ones refuse the keyword).
TCP_USER_TIMEOUT_MS = 8_000
# A connection waiting for an answer with nothing unacknowledged is probed after 5 s of silence,
# every second: a vanished server is noticed within ~8 s, without tcp_user_timeout too (5 + 3 x 1).
TCP_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "1", "keepalives_count": "3"}

_CREATE_REJECTED = """
CREATE TABLE IF NOT EXISTS user_logins_rejected (
    message_id     varchar(128) PRIMARY KEY,
    reason         text        NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    sent_at        timestamptz,
    receive_count  integer     NOT NULL DEFAULT 1,
    encrypted_body text        NOT NULL
)"""

# For analysts: every masked device id or IP seen more than once, with how many logins and users.
_CREATE_DUPLICATES_VIEW = """
CREATE OR REPLACE VIEW user_login_duplicates AS
SELECT 'device_id'::text AS field, masked_device_id AS masked_value, count(*) AS logins,
       count(DISTINCT user_id) AS users, min(create_date) AS first_seen, max(create_date) AS last_seen
  FROM user_logins WHERE masked_device_id IS NOT NULL
 GROUP BY masked_device_id HAVING count(*) > 1
UNION ALL
SELECT 'ip'::text, masked_ip, count(*), count(DISTINCT user_id), min(create_date), max(create_date)
  FROM user_logins WHERE masked_ip IS NOT NULL
 GROUP BY masked_ip HAVING count(*) > 1
UNION ALL
SELECT 'network'::text, masked_network, count(*), count(DISTINCT user_id), min(create_date), max(create_date)
  FROM user_logins WHERE masked_network IS NOT NULL
 GROUP BY masked_network HAVING count(*) > 1"""


# For analysts' all-time top 20: the view's answer stored, refreshed by `python main.py snapshot`
# (database/snapshot.py). Made WITH NO DATA (instant); each statement idempotent.
SNAPSHOT_VIEW = "user_login_duplicates_snapshot"
# When it was refreshed: one row, written by the refresh in its own transaction. Not a column of the
# view: a value new in every row at each refresh made REFRESH … CONCURRENTLY delete and insert every
# row (tens of millions at 100M logins), not only the rows whose counts changed.
SNAPSHOT_REFRESHED = "user_login_duplicates_snapshot_refreshed"
_CREATE_SNAPSHOT = (
    f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {SNAPSHOT_VIEW} AS
SELECT field, masked_value, logins, users, first_seen, last_seen
  FROM user_login_duplicates
WITH NO DATA""",
    # REFRESH … CONCURRENTLY needs a unique index on plain columns covering every row.
    f"CREATE UNIQUE INDEX IF NOT EXISTS {SNAPSHOT_VIEW}_key ON {SNAPSHOT_VIEW} (field, masked_value)",
    # The top 20 of one field by logins, or by users: the first 20 entries of one of these.
    f"CREATE INDEX IF NOT EXISTS {SNAPSHOT_VIEW}_logins ON {SNAPSHOT_VIEW} (field, logins DESC)",
    f"CREATE INDEX IF NOT EXISTS {SNAPSHOT_VIEW}_users ON {SNAPSHOT_VIEW} (field, users DESC)",
    # `only_row` (true, the key) keeps it to one row, which the refresh upserts.
    f"""CREATE TABLE IF NOT EXISTS {SNAPSHOT_REFRESHED} (
    only_row     boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    refreshed_at timestamptz NOT NULL
)""",
)


def _drop_snapshot_with_refreshed_at_column(cur: Cursor) -> None:
    """Drop the snapshot if it has the per-row `refreshed_at` of unreleased schema 5 (dev and test
    databases made before it moved to its own table): made again by _CREATE_SNAPSHOT WITH NO DATA,
    instant (its next refresh is a plain one). Its indexes and grants go with it (roles.sql regrants)."""
    cur.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'refreshed_at' AND NOT attisdropped",
        (SNAPSHOT_VIEW,),
    )
    if cur.fetchone() is not None:
        cur.execute(f"DROP MATERIALIZED VIEW {SNAPSHOT_VIEW}")  # no CASCADE: an analyst's view on it stops us


# For analysts (who cannot read the quarantine): which rows of user_logins were loaded by a replay.
_CREATE_REPLAYED_VIEW = """
CREATE OR REPLACE VIEW user_logins_replayed AS
SELECT message_id, replayed_at, replay_audit_id, reason AS quarantine_reason
  FROM user_logins_rejected WHERE replayed_at IS NOT NULL"""


class DatabaseError(Exception):
    """Root of the errors raised by this package."""


class DatabaseUnavailable(DatabaseError):
    """Raised when PostgreSQL cannot be reached or the connection broke; retry later."""


class SchemaBusy(DatabaseUnavailable):
    """Raised when a schema migration gave up waiting for a lock (an open transaction holds it); retry later."""


class KeyMismatch(DatabaseError):
    """Raised when a key version of the keyring is recorded in the database with another key (key_checks)."""


class DatabaseRejectedRows(DatabaseError):
    """Raised when PostgreSQL refused data in a batch: the rows it refuses alone, with the reason."""

    def __init__(self, bad_logins: list[tuple[MaskedLogin, str]], bad_rejections: list[tuple[Rejection, str]]) -> None:
        super().__init__(f"{len(bad_logins) + len(bad_rejections)} row(s) refused by PostgreSQL")
        self.bad_logins = bad_logins
        self.bad_rejections = bad_rejections


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
        backoff: Backoff | None = None,
        key_checks: Mapping[int, str] | None = None,
    ) -> None:
        self._dsn = dsn
        # {version: check value} of the keyring whose tokens this writer writes: compared with the
        # database's at every connect, before anything is written (None: writes no tokens).
        self._key_checks = dict(key_checks) if key_checks is not None else None
        policy = backoff or Backoff()
        self._partitions_backoff = Backoff(policy.base_seconds, max(policy.cap_seconds, PARTITION_RETRY_CAP_SECONDS))
        self._partitions_failures = 0
        self._migrate_batch_pages = max(1, migrate_batch_pages)
        self._partition_days: set[date] = set()
        self._partitions_checked_on: date | None = None
        self._partitions_retry_at = 0.0
        self._lock_timeout_ms = max(1, int(lock_timeout_seconds * 1000))
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
                self._migrate()
            self._ensure_partitions(partitions.utc_today())
            self._run(self._create_stage)
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

        def inspect(cur: Cursor) -> int | None:
            cur.execute("SELECT to_regclass('etl_schema_version')")
            if one_row(cur)[0] is None:
                return None
            cur.execute("SELECT max(version) FROM etl_schema_version")
            version = one_row(cur)[0]
            return None if version is None else int(version)

        return self._run(inspect, commit=False)

    def schema_problem(self) -> str | None:
        """Without changing anything: None if the schema is current, else what is wrong."""
        return self._run(schema_problem, commit=False)

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
            try:
                self._conn.close()
            except psycopg2.Error:
                pass
            self._conn = None

    # -- schema -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        # Under a session advisory lock (two processes starting at once take turns, the second
        # finds everything in place), in several transactions: the move of a legacy table commits
        # batch by batch, so a killed migration resumes where it stopped. No lock is waited for
        # longer than the timeout.
        def lock(cur: Cursor) -> None:
            cur.execute(f"SET lock_timeout = {self._lock_timeout_ms}")
            cur.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK_ID,))

        self._run(lock)
        try:
            self._run(self._migrate_tables)
            self._move_legacy()
            self._run(self._migrate_views)
        finally:
            if self.connected:
                self._run(
                    lambda cur: cur.execute("SELECT pg_advisory_unlock(%s); RESET lock_timeout", (_SCHEMA_LOCK_ID,))
                )

    def _migrate_tables(self, cur: Cursor) -> None:
        cur.execute(_CREATE_REJECTED)
        cur.execute("CREATE INDEX IF NOT EXISTS user_logins_rejected_received_at ON user_logins_rejected (received_at)")
        cur.execute(key_checks.CREATE_TABLE)  # schema 5 -> 6
        cur.execute(f"CREATE SEQUENCE IF NOT EXISTS {QUARANTINE_EPOCH}")  # schema 8
        cur.execute(
            """CREATE TABLE IF NOT EXISTS etl_schema_version (
                   version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        kind = partitions.relkind(cur, partitions.TABLE)
        if kind is None:
            partitions.create_partitioned(cur)
        elif kind == "r":
            # Today's table (or the original exercise's: integer app_version, no message_id):
            # renamed, replaced by the partitioned one, its rows moved in batches afterwards.
            partitions.start_legacy_move(cur)
        # Schema 7: the network token (NULL in the rows before it: `backfill-networks` fills them). On a
        # partitioned table a nullable column without a default is a catalog change, instant.
        cur.execute(f"ALTER TABLE {partitions.TABLE} ADD COLUMN IF NOT EXISTS masked_network varchar(64)")
        # Schema 4 -> 5 (a schema 3 goes straight to 5): no token index on the parent, nor so on
        # today's partition; token_indexes.py builds the closed days' own, CONCURRENTLY.
        partitions.drop_parent_token_indexes(cur)
        partitions.ensure_days(cur, partitions.window(partitions.utc_today()))

    def _move_legacy(self) -> None:
        pages = self._run(partitions.legacy_pages, commit=False)
        if pages == 0 and self._run(lambda cur: partitions.relkind(cur, partitions.LEGACY_TABLE), commit=False) is None:
            return
        page, moved, logged = 0, 0, time.monotonic()
        while page < pages:
            moved += self._run(partial(partitions.move_legacy_batch, first_page=page, pages=self._migrate_batch_pages))
            page += self._migrate_batch_pages
            if time.monotonic() - logged >= 5:
                logger.info(
                    "moving %s into daily partitions: page %d of %d, %d rows moved",
                    partitions.LEGACY_TABLE,
                    min(page, pages),
                    pages,
                    moved,
                )
                logged = time.monotonic()
        logger.info("moved %d rows from %s into daily partitions", moved, partitions.LEGACY_TABLE)
        self._run(partitions.finish_legacy_move)

    def _migrate_views(self, cur: Cursor) -> None:
        cur.execute(_CREATE_DUPLICATES_VIEW)
        # `python main.py replay` (database/replay.py) marks the quarantine rows it loaded.
        cur.execute("""ALTER TABLE user_logins_rejected ADD COLUMN IF NOT EXISTS replayed_at timestamptz,
                       ADD COLUMN IF NOT EXISTS replay_audit_id bigint""")
        cur.execute(_CREATE_REPLAYED_VIEW)
        _drop_snapshot_with_refreshed_at_column(cur)
        for sql in _CREATE_SNAPSHOT:  # schema 4 -> 5, with the parent token indexes dropped above
            cur.execute(sql)
        cur.execute("INSERT INTO etl_schema_version (version) VALUES (%s) ON CONFLICT DO NOTHING", (SCHEMA_VERSION,))

    def _ensure_partitions(self, today: date) -> None:
        """Make sure the partitions of yesterday, today and the next days exist.

        Looked at first without a lock; created only when missing, under the schema advisory lock
        and the lock timeout (creating a partition locks the parent table).
        """
        days = partitions.window(today)
        have = self._run(partitions.partition_days, commit=False)
        if not have.issuperset(days):

            def create(cur: Cursor) -> None:
                cur.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
                partitions.ensure_days(cur, days)

            self._run(create)
            have = self._run(partitions.partition_days, commit=False)
        self._partition_days = have
        self._partitions_checked_on = today

    def _ensure_partitions_daily(self) -> None:
        """Once per UTC day while running: the coming days' partitions. A lock held by someone
        else is not waited out: the default partition takes the rows meanwhile, retried later."""
        today = partitions.utc_today()
        if today == self._partitions_checked_on or time.monotonic() < self._partitions_retry_at:
            return
        try:
            self._ensure_partitions(today)
        except psycopg2.errors.LockNotAvailable:
            holders = self._run(lock_holders, commit=False)
            self._partitions_failures += 1
            delay = self._partitions_backoff.delay(self._partitions_failures)
            self._partitions_retry_at = time.monotonic() + delay
            logger.warning(
                "creating the coming days' partitions waited %d ms for a lock %s; trying again in %.0f s",
                self._lock_timeout_ms,
                holders,
                delay,
            )
        else:
            self._partitions_failures = 0

    def _create_stage(self, cur: Cursor) -> None:
        # Staging table for COPY: private to this session, emptied at each commit.
        cur.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
        cur.execute(
            """CREATE TEMP TABLE IF NOT EXISTS user_logins_stage
               (LIKE user_logins INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""
        )
        # The quarantine rows' COPY target (text columns: a value too long for the table fails the
        # INSERT after it, as a DataError the fallback can pin on its row).
        cur.execute(
            """CREATE TEMP TABLE IF NOT EXISTS user_logins_rejected_stage
               (message_id text, reason text, sent_at timestamptz, receive_count integer,
                encrypted_body text, day date) ON COMMIT DELETE ROWS"""
        )

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
        self._ensure_partitions_daily()
        if logins and self._partition_days:
            outside = sum(1 for row in logins if row.create_date not in self._partition_days)
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
        except _ROW_ERRORS as exc:
            bad_logins = self._find_bad_rows(logins, [])
            bad_rejections = self._find_bad_rows([], rejections)
            if not bad_logins and not bad_rejections:  # no row fails alone: not the data's fault
                raise DatabaseUnavailable(f"batch refused: {exc.pgcode}") from None
            raise DatabaseRejectedRows(
                [(row, reason) for row, reason in bad_logins if isinstance(row, MaskedLogin)],
                [(row, reason) for row, reason in bad_rejections if isinstance(row, Rejection)],
            ) from None

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
        epoch = self._lock_quarantine(cur, exclusive=exclusive, bump=quarantines_redelivered)
        straight = not exclusive and self._epoch_before(received_since) == epoch
        inserted = rejected = 0
        if logins:
            inserted = self._insert_logins(cur, logins, straight)
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
        cur.execute(_READ_EPOCH)
        self._epochs.append((time.monotonic(), int(one_row(cur)[0])))

    def _epoch_before(self, moment: float) -> int | None:
        """The epoch this writer read last before `moment` (None: it read none before)."""
        for seen_at, epoch in reversed(self._epochs):
            if seen_at < moment:
                return epoch
        return None

    def _insert_logins(self, cur: Cursor, logins: Sequence[MaskedLogin], straight: bool) -> int:
        """Insert the rows that are new and not quarantined; return how many.

        When `straight` (write() says when no quarantine row can hold one of them), and usually none
        of them is stored yet, a COPY straight into user_logins is the fastest write (one statement,
        each row written once). When one is (a redelivery), the unique constraint refuses the COPY;
        the transaction, which holds nothing else yet (logins are written first), is rolled back
        and the batch goes through the staging table and ``ON CONFLICT DO NOTHING`` instead, as do
        the next batches: redeliveries come in runs.
        """
        text = _copy_text(logins)
        buffer = io.StringIO(text)
        # One read of the whole text: each read is a trip back into Python (and a wait for the
        # GIL while the receivers parse and mask), so the default 8 KiB chunks cost.
        size = max(8192, len(text))
        if straight and self._staged_batches_left == 0:
            try:
                cur.copy_expert(f"COPY user_logins ({_COLUMN_LIST}) FROM STDIN", buffer, size=size)
                return len(logins)
            except psycopg2.errors.UniqueViolation:
                cur.connection.rollback()  # which let the quarantine lock go: taken again
                self._lock_quarantine(cur, exclusive=False, bump=False)
                self._staged_batches_left = STAGED_BATCHES_AFTER_CONFLICT
                buffer.seek(0)
        elif self._staged_batches_left:
            self._staged_batches_left -= 1
        cur.copy_expert(f"COPY user_logins_stage ({_COLUMN_LIST}) FROM STDIN", buffer, size=size)
        cur.execute(_STAGED_LOGIN_INSERT)
        return cur.rowcount

    def _find_bad_rows(
        self, logins: Sequence[MaskedLogin], rejections: Sequence[Rejection]
    ) -> list[tuple[MaskedLogin | Rejection, str]]:
        """Try each row alone (rolled back) to name the ones PostgreSQL refuses."""
        bad: list[tuple[MaskedLogin | Rejection, str]] = []
        rows: list[tuple[MaskedLogin | Rejection, Callable[[Cursor], WriteResult]]] = [
            *((login, partial(self._write, logins=[login], rejections=[])) for login in logins),
            *((rejection, partial(self._write, logins=[], rejections=[rejection])) for rejection in rejections),
        ]
        for row, work in rows:
            try:
                self._run(work, commit=False)
            except _ROW_ERRORS as exc:
                bad.append((row, f"refused by PostgreSQL: {exc.pgcode} {first_line(exc).split(':')[0]}"))
        return bad

    def _run(self, work: Callable[[Cursor], T], *, commit: bool = True) -> T:
        """Run `work(cursor)` in one transaction; map connection failures to DatabaseUnavailable."""
        if self._conn is None or self._conn.closed:
            raise DatabaseUnavailable("not connected")
        try:
            with self._conn.cursor() as cur:
                result = work(cur)
            if commit:
                self._conn.commit()
            else:
                self._conn.rollback()
            return result
        except psycopg2.errors.LockNotAvailable:
            self._conn.rollback()  # lock_timeout: the connection is fine, the caller says what waited
            raise
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            self.close()
            raise DatabaseUnavailable(first_line(exc)) from None
        except _ROW_ERRORS:
            try:
                self._conn.rollback()
            except psycopg2.Error:
                self.close()
            raise
        except psycopg2.Error as exc:
            # Not the rows' fault (a dropped table, a permission, a server error): reconnect,
            # which re-runs the migrations, and retry the batch.
            self.close()
            raise DatabaseUnavailable(f"{exc.pgcode or type(exc).__name__}: {first_line(exc)}") from None


def open_connection(
    dsn: str, *, connect_timeout: int, application_name: str, statement_timeout_seconds: float | None = None
) -> Connection:
    """The one way this package connects: every session (the ETL's, rekey's, replay's, retention's,
    the unmask audit's) gets the TCP settings of connection_parameters(), so that none of them waits
    ~15 minutes on a half-open connection. Raises DatabaseUnavailable."""
    extra = connection_parameters(dsn, statement_timeout_seconds=statement_timeout_seconds)
    try:
        return psycopg2.connect(
            make_dsn(dsn, **extra), connect_timeout=connect_timeout, application_name=application_name
        )
    except psycopg2.OperationalError as exc:
        raise DatabaseUnavailable(first_line(exc)) from None


@contextmanager
def command_errors(command: str, *, lock_timeout: Callable[[], DatabaseError] | None = None) -> Iterator[None]:
    """psycopg2's errors inside a one-shot command (replay, retention, snapshot) as this package's:
    a lock waited for past lock_timeout -> `lock_timeout()` when given; a lost connection ->
    DatabaseUnavailable; anything else PostgreSQL refused (a right missing, the schema behind) ->
    DatabaseError naming `command`. Our own errors pass through."""
    try:
        yield
    except psycopg2.Error as exc:
        if lock_timeout is not None and isinstance(exc, psycopg2.errors.LockNotAvailable):
            raise lock_timeout() from None
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            raise DatabaseUnavailable(first_line(exc)) from None
        raise DatabaseError(f"{command} refused by PostgreSQL ({exc.pgcode}: {first_line(exc)})") from None


def connection_parameters(dsn: str, *, statement_timeout_seconds: float | None = None) -> dict[str, str]:
    """What psycopg2.connect gets beside `dsn`: the TCP keepalives and tcp_user_timeout the DSN does
    not set, and a statement_timeout added to the DSN's `options` unless they already set one.

    Never a value the DSN gives (an explicit keyword would override it).
    """
    try:
        given = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return {}  # psycopg2.connect says what is wrong with it
    defaults = dict(TCP_KEEPALIVES)
    if psycopg2.__libpq_version__ >= 120000:
        defaults["tcp_user_timeout"] = str(TCP_USER_TIMEOUT_MS)
    extra = {name: value for name, value in defaults.items() if name not in given}
    options = given.get("options", "")
    if statement_timeout_seconds is not None and "statement_timeout" not in options:
        milliseconds = max(1, int(statement_timeout_seconds * 1000))
        extra["options"] = f"{options} -c statement_timeout={milliseconds}".strip()
    return extra


def _insert_rejections(cur: Cursor, rejections: Sequence[Rejection]) -> list[str]:
    """Insert quarantine rows, but none whose message is loaded already; return the message ids stored.

    Written like the logins: one COPY into the session's staging table (emptied at commit), then one
    INSERT … SELECT per kind of row (a known day probes the partition of that day only, an unknown
    one every partition), RETURNING the ids (a rowcount would not say which). A row PostgreSQL
    refuses fails the statement, and write()'s fallback names it, as for logins.
    """
    text = _rejection_copy_text(rejections)
    cur.copy_expert(
        f"COPY user_logins_rejected_stage ({_REJECTED_STAGE_COLUMNS}) FROM STDIN",
        io.StringIO(text),
        size=max(8192, len(text)),
    )
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
# A login not quarantined already (probed per row, as above), nor stored already.
_STAGED_LOGIN_INSERT = f"""INSERT INTO user_logins ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM user_logins_stage s
    WHERE NOT EXISTS (SELECT 1 FROM user_logins_rejected r WHERE r.message_id = s.message_id OFFSET 0)
    ON CONFLICT (message_id, create_date) DO NOTHING"""


_READ_EPOCH = f"SELECT coalesce(pg_sequence_last_value('{QUARANTINE_EPOCH}'), 0)"
_REJECTED_STAGE_COLUMNS = "message_id, reason, sent_at, receive_count, encrypted_body, day"


def _rejection_copy_text(rejections: Sequence[Rejection]) -> str:
    """Quarantine rows in COPY text format, for user_logins_rejected_stage (every text escaped:
    a reason may hold anything PostgreSQL said)."""
    lines = []
    for r in rejections:
        sent = "\\N" if r.sent_at is None else r.sent_at.isoformat()
        day = "\\N" if r.create_date is None else r.create_date.isoformat()
        message_id, reason = r.message_id.translate(_COPY_ESCAPES), r.reason.translate(_COPY_ESCAPES)
        body = r.encrypted_body  # a token (base64): nothing to escape; checked, as translate() costs on 90 KB
        if "\\" in body or "\t" in body or "\n" in body or "\r" in body:
            body = body.translate(_COPY_ESCAPES)
        lines.append(f"{message_id}\t{reason}\t{sent}\t{r.receive_count}\t{body}\t{day}")
    lines.append("")
    return "\n".join(lines)


# Errors caused by particular rows: those rows are quarantined, the rest of the batch is written.
_ROW_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError)

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text(logins: Sequence[MaskedLogin]) -> str:
    """Rows in COPY text format (tab-separated, \\N for NULL, backslash escapes).

    Fast path: values almost never hold a tab, newline or backslash, so each row is joined once
    and checked; only a row that needs it is escaped field by field.
    """
    lines = []
    dates: dict[object, str] = {}
    for row in logins:
        day = dates.get(row.create_date)
        if day is None:
            day = dates[row.create_date] = row.create_date.isoformat()
        fields = (
            row.message_id,
            row.user_id,
            row.device_type,
            row.masked_ip,
            row.masked_device_id,
            row.app_version,
            day,
        )
        head = "\t".join(fields)
        if head.count("\t") != 6 or "\\" in head or "\n" in head or "\r" in head:
            head = "\t".join(f.translate(_COPY_ESCAPES) for f in fields)
        locale = "\\N" if row.locale is None else row.locale.translate(_COPY_ESCAPES)
        network = row.masked_network or "\\N"  # base64: nothing to escape
        lines.append(f"{head}\t{locale}\t{network}")
    lines.append("")
    return "\n".join(lines)


def lock_holders(cur: Cursor) -> str:
    """Who holds locks on our tables: pid, application, state and since when; never a query's text."""
    cur.execute(
        """SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), '?'), coalesce(a.state, '?'),
                  to_char(a.xact_start AT TIME ZONE 'UTC', 'HH24:MI:SS'),
                  coalesce(c.relname, 'the schema set-up lock')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid LEFT JOIN pg_class c ON c.oid = l.relation
            WHERE l.granted AND l.pid <> pg_backend_pid()
              AND ((c.relnamespace = current_schema()::regnamespace
                    AND (c.relname IN ('user_logins', 'user_logins_rejected', 'user_login_duplicates',
                                       'user_logins_replayed', 'etl_schema_version', 'user_logins_default',
                                       'user_logins_legacy', 'user_login_duplicates_snapshot',
                                       'user_login_duplicates_snapshot_refreshed')
                         OR c.relname LIKE 'user\\_logins\\_p%%'))
                   OR (l.locktype = 'advisory' AND l.objid = %s))
            ORDER BY 1 LIMIT 5""",
        (_SCHEMA_LOCK_ID & 0xFFFFFFFF,),
    )
    held = [f"pid {pid} ({app}, {state} since {since} UTC) on {rel}" for pid, app, state, since, rel in cur.fetchall()]
    return "held by " + "; ".join(held) if held else "(its holder has gone)"


def schema_problem(cur: Cursor) -> str | None:
    """None if the schema is current, else what is wrong (reads only; raises psycopg2 errors)."""
    cur.execute(
        "SELECT to_regclass('user_logins'), to_regclass('user_logins_rejected'), to_regclass('etl_schema_version')"
    )
    if None in one_row(cur):
        return "tables missing"
    cur.execute("SELECT max(version) FROM etl_schema_version")
    version = one_row(cur)[0]
    if version != SCHEMA_VERSION:
        return f"schema version {version}, expected {SCHEMA_VERSION}"
    if partitions.relkind(cur, partitions.LEGACY_TABLE) is not None:
        return f"{partitions.LEGACY_TABLE} is still being moved into the daily partitions"
    cur.execute("SELECT to_regclass(%s)", (key_checks.TABLE,))
    if one_row(cur)[0] is None:
        return f"{key_checks.TABLE} missing"
    cur.execute("SELECT to_regclass(%s)", (SNAPSHOT_REFRESHED,))
    if one_row(cur)[0] is None:  # unreleased schema 5 (refreshed_at in the snapshot's rows): remade at start
        return f"{SNAPSHOT_REFRESHED} missing (an unreleased schema 5)"
    return None


def one_row(cur: Cursor) -> tuple[Any, ...]:
    """The row of a query that always returns exactly one."""
    row = cur.fetchone()
    assert row is not None, "the query returns one row"
    return row


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (psycopg2's carry a DETAIL and a CONTEXT after it)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
