"""PostgresWriter: schema migrations, idempotent batch writes of logins and rejections.

Idempotency: every row carries the SQS MessageId under a unique constraint. A batch is COPYed
straight into the table; if the constraint refuses it (a message already stored), the batch is
written again through a staging table with ``ON CONFLICT (message_id) DO NOTHING``. A message
redelivered after a crash between commit and delete is therefore stored once. One transaction per
batch, never per row.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
from psycopg2.extensions import cursor as Cursor
from psycopg2.extras import execute_values

from models import MaskedLogin, Rejection, WriteResult

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Any constant: serialises schema set-up between processes starting at once.
_SCHEMA_LOCK_ID = 7_412_350_191
SCHEMA_VERSION = 3  # 1: tables and message_id; 2: the user_login_duplicates view; 3: replay columns and view

# COPY order: `locale`, the only nullable value, last, so a row is built with one join.
_LOGIN_COLUMNS = (
    "message_id",
    "user_id",
    "device_type",
    "masked_ip",
    "masked_device_id",
    "app_version",
    "create_date",
    "locale",
)
_COLUMN_LIST = ", ".join(_LOGIN_COLUMNS)
# After a batch that held an already-stored message, this many batches go through staging.
STAGED_BATCHES_AFTER_CONFLICT = 10
# Longest wait for any lock the schema set-up needs; past it the set-up is retried with backoff.
DEFAULT_LOCK_TIMEOUT_SECONDS = 2.0

_CREATE_LOGINS = """
CREATE TABLE IF NOT EXISTS user_logins (
    user_id          varchar(128),
    device_type      varchar(32),
    masked_ip        varchar(256),
    masked_device_id varchar(256),
    locale           varchar(32),
    app_version      varchar(32),
    create_date      date,
    message_id       varchar(128)
)"""

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
 GROUP BY masked_ip HAVING count(*) > 1"""


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


class DatabaseRejectedRows(DatabaseError):
    """Raised when PostgreSQL refused data in a batch: the rows it refuses alone, with the reason."""

    def __init__(self, bad_logins: list[tuple[MaskedLogin, str]], bad_rejections: list[tuple[Rejection, str]]) -> None:
        super().__init__(f"{len(bad_logins) + len(bad_rejections)} row(s) refused by PostgreSQL")
        self.bad_logins = bad_logins
        self.bad_rejections = bad_rejections


class PostgresWriter:
    """Owns one connection; writes batches in single transactions."""

    def __init__(self, dsn: str, *, connect_timeout_seconds: int = 5, application_name: str = "login-etl",
                 lock_timeout_seconds: float = DEFAULT_LOCK_TIMEOUT_SECONDS) -> None:
        self._dsn = dsn
        self._lock_timeout_ms = max(1, int(lock_timeout_seconds * 1000))
        self._connect_timeout = connect_timeout_seconds
        self._application_name = application_name
        self._conn: psycopg2.extensions.connection | None = None
        self._staged_batches_left = 0

    def __repr__(self) -> str:
        return "PostgresWriter()"  # the DSN may hold a password

    # -- connection ---------------------------------------------------------------------------

    def connect(self, *, migrate: bool = True) -> None:
        """Open the connection and (unless told not to) bring the schema up to date.

        The schema is looked at first, without taking a lock; only a schema that is behind is
        migrated. Every lock a migration (or the session's staging table) waits for is bounded by
        the lock timeout: SchemaBusy then names who holds it, and the caller retries later. So a
        restart never queues behind an analyst's open transaction, nor makes the analysts'
        next queries queue behind it.
        """
        self.close()
        try:
            self._conn = psycopg2.connect(
                self._dsn, connect_timeout=self._connect_timeout, application_name=self._application_name
            )
        except psycopg2.OperationalError as exc:
            raise DatabaseUnavailable(first_line(exc)) from None
        if not migrate:
            return
        try:
            if self.schema_problem() is not None:
                self._run(self._migrate)
            self._run(self._create_stage)
        except psycopg2.errors.LockNotAvailable:
            holders = self._run(_lock_holders, commit=False)
            self.close()
            raise SchemaBusy(f"schema set-up waited {self._lock_timeout_ms} ms for a lock {holders}; "
                             "it will try again") from None

    def schema_problem(self) -> str | None:
        """Without changing anything: None if the schema is current, else what is wrong."""
        def inspect(cur: Cursor) -> str | None:
            cur.execute("SELECT to_regclass('user_logins'), to_regclass('user_logins_rejected'), "
                        "to_regclass('etl_schema_version')")
            if None in one_row(cur):
                return "tables missing"
            cur.execute("SELECT max(version) FROM etl_schema_version")
            version = one_row(cur)[0]
            if version != SCHEMA_VERSION:
                return f"schema version {version}, expected {SCHEMA_VERSION}"
            return None

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

    def _migrate(self, cur: Cursor) -> None:
        # One transaction under an advisory lock: two processes starting at once take turns,
        # and the second finds everything in place. No lock is waited for longer than the timeout.
        cur.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_ID,))
        cur.execute(_CREATE_LOGINS)
        cur.execute(_CREATE_REJECTED)
        # The original exercise's table has `app_version integer` and no message_id:
        # migrate it in place, keeping its rows (integers become their decimal text).
        cur.execute(
            """SELECT column_name, data_type FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'user_logins'"""
        )
        columns = dict(cur.fetchall())
        if columns.get("app_version") != "character varying":
            logger.info("migrating user_logins.app_version from %s to varchar(32)", columns.get("app_version"))
            cur.execute("ALTER TABLE user_logins ALTER COLUMN app_version TYPE varchar(32) USING app_version::text")
        if "message_id" not in columns:
            logger.info("adding user_logins.message_id")
            cur.execute("ALTER TABLE user_logins ADD COLUMN message_id varchar(128)")
        cur.execute(
            """SELECT 1 FROM pg_constraint
               WHERE conrelid = 'user_logins'::regclass AND conname = 'user_logins_message_id_key'"""
        )
        if cur.fetchone() is None:
            cur.execute("ALTER TABLE user_logins ADD CONSTRAINT user_logins_message_id_key UNIQUE (message_id)")
        cur.execute(
            """CREATE TABLE IF NOT EXISTS etl_schema_version (
                   version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        cur.execute(_CREATE_DUPLICATES_VIEW)
        # `python main.py replay` (database/replay.py) marks the quarantine rows it loaded.
        cur.execute("""ALTER TABLE user_logins_rejected ADD COLUMN IF NOT EXISTS replayed_at timestamptz,
                       ADD COLUMN IF NOT EXISTS replay_audit_id bigint""")
        cur.execute(_CREATE_REPLAYED_VIEW)
        cur.execute("INSERT INTO etl_schema_version (version) VALUES (%s) ON CONFLICT DO NOTHING", (SCHEMA_VERSION,))

    def _create_stage(self, cur: Cursor) -> None:
        # Staging table for COPY: private to this session, emptied at each commit.
        cur.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
        cur.execute(
            """CREATE TEMP TABLE IF NOT EXISTS user_logins_stage
               (LIKE user_logins INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""
        )

    # -- writes -------------------------------------------------------------------------------

    def write(
        self, logins: Sequence[MaskedLogin], rejections: Sequence[Rejection], *, redelivered: bool = False
    ) -> WriteResult:
        """Store a batch in one transaction; return once it has committed.

        A message is stored in one of the two tables, never both: a rejection is not stored for a
        message already loaded, nor (when `redelivered`: the batch holds messages received before)
        a login for one already quarantined. Only a redelivered message can be in either table.

        Raises DatabaseUnavailable (nothing committed; retry the batch) or DatabaseRejectedRows
        (nothing committed; the listed rows are refused by PostgreSQL, the rest are good).
        """
        try:
            return self._run(lambda cur: self._write(cur, logins, rejections, staged=redelivered))
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
        self, cur: Cursor, logins: Sequence[MaskedLogin], rejections: Sequence[Rejection], staged: bool = False
    ) -> WriteResult:
        inserted = rejected = 0
        if logins:
            inserted = self._insert_logins(cur, logins, staged)
        if rejections:
            # RETURNING, not rowcount: execute_values runs one statement per page, and rowcount
            # would hold the last page's count only.
            stored = execute_values(
                cur,
                """INSERT INTO user_logins_rejected (message_id, reason, sent_at, receive_count, encrypted_body)
                   SELECT v.* FROM (VALUES %s) AS v (message_id, reason, sent_at, receive_count, encrypted_body)
                    WHERE NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id = v.message_id)
                   ON CONFLICT (message_id) DO NOTHING RETURNING message_id""",
                [(r.message_id, r.reason, r.sent_at, r.receive_count, r.encrypted_body) for r in rejections],
                template="(%s, %s, %s::timestamptz, %s::integer, %s)",
                page_size=1000,
                fetch=True,
            )
            rejected = len(stored)
        duplicates = len(logins) + len(rejections) - inserted - rejected
        return WriteResult(inserted=inserted, rejected=rejected, duplicates=duplicates,
                           rejected_ids=frozenset(row[0] for row in stored) if rejections else frozenset())

    def _insert_logins(self, cur: Cursor, logins: Sequence[MaskedLogin], staged: bool = False) -> int:
        """Insert the rows that are new; return how many.

        Usually none of them is stored yet, and a COPY straight into user_logins is the fastest
        write (one statement, each row written once). When one is (a redelivery), the unique
        constraint refuses the COPY; the transaction, which holds nothing else yet (logins are
        written first), is rolled back and the batch goes through the staging table and
        ``ON CONFLICT DO NOTHING`` instead, as do the next batches: redeliveries come in runs.
        """
        text = _copy_text(logins)
        buffer = io.StringIO(text)
        # One read of the whole text: each read is a trip back into Python (and a wait for the
        # GIL while the receivers parse and mask), so the default 8 KiB chunks cost.
        size = max(8192, len(text))
        if self._staged_batches_left == 0 and not staged:
            try:
                cur.copy_expert(f"COPY user_logins ({_COLUMN_LIST}) FROM STDIN", buffer, size=size)
                return len(logins)
            except psycopg2.errors.UniqueViolation:
                cur.connection.rollback()
                self._staged_batches_left = STAGED_BATCHES_AFTER_CONFLICT
                buffer.seek(0)
        elif self._staged_batches_left:
            self._staged_batches_left -= 1
        cur.copy_expert(f"COPY user_logins_stage ({_COLUMN_LIST}) FROM STDIN", buffer, size=size)
        cur.execute(
            f"""INSERT INTO user_logins ({_COLUMN_LIST}) SELECT {_COLUMN_LIST} FROM user_logins_stage s
                 WHERE NOT EXISTS (SELECT 1 FROM user_logins_rejected r WHERE r.message_id = s.message_id)
                ON CONFLICT (message_id) DO NOTHING"""
        )
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
        fields = (row.message_id, row.user_id, row.device_type, row.masked_ip, row.masked_device_id,
                  row.app_version, day)
        head = "\t".join(fields)
        if head.count("\t") != 6 or "\\" in head or "\n" in head or "\r" in head:
            head = "\t".join(f.translate(_COPY_ESCAPES) for f in fields)
        locale = "\\N" if row.locale is None else row.locale.translate(_COPY_ESCAPES)
        lines.append(f"{head}\t{locale}")
    lines.append("")
    return "\n".join(lines)


def _lock_holders(cur: Cursor) -> str:
    """Who holds locks on our tables: pid, application, state and since when; never a query's text."""
    cur.execute(
        """SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), '?'), coalesce(a.state, '?'),
                  to_char(a.xact_start AT TIME ZONE 'UTC', 'HH24:MI:SS'),
                  coalesce(c.relname, 'the schema set-up lock')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid LEFT JOIN pg_class c ON c.oid = l.relation
            WHERE l.granted AND l.pid <> pg_backend_pid()
              AND ((c.relnamespace = current_schema()::regnamespace
                    AND c.relname IN ('user_logins', 'user_logins_rejected', 'user_login_duplicates',
                                      'user_logins_replayed', 'etl_schema_version'))
                   OR (l.locktype = 'advisory' AND l.objid = %s))
            ORDER BY 1 LIMIT 5""", (_SCHEMA_LOCK_ID & 0xFFFFFFFF,))
    held = [f"pid {pid} ({app}, {state} since {since} UTC) on {rel}" for pid, app, state, since, rel in cur.fetchall()]
    return "held by " + "; ".join(held) if held else "(its holder has gone)"


def one_row(cur: Cursor) -> tuple[Any, ...]:
    """The row of a query that always returns exactly one."""
    row = cur.fetchone()
    assert row is not None, "the query returns one row"
    return row


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (psycopg2's carry a DETAIL and a CONTEXT after it)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
