"""The all-time duplicates snapshot: a materialized copy of `user_login_duplicates`, refreshed by
`python main.py snapshot` (nightly: a CronJob, or cron), for the analysts' all-time top 20.

The live view counts over every day kept, so it reads one token-index entry per login (minutes at
100M rows). The snapshot holds its answer, one row per token seen more than once: the top-20
queries read a few entries of its (field, logins DESC) or (field, users DESC) index. When the
refresh that made it started is the one row of `user_login_duplicates_snapshot_refreshed`. It is
stale by up to the time since the last refresh, and only the refresh keeps it right
(docs/partitions.md "Analysts at scale"): after `rekey` it shows the old tokens, after `retention`
the dropped days, until the next one.

- Schema 5 creates it WITH NO DATA, instant on any table (`_CREATE_SNAPSHOT`, database/sqs_postgres.py):
  reading it before the first refresh is PostgreSQL's "has not been populated" error. The first
  refresh is a plain one (an unpopulated view cannot be refreshed CONCURRENTLY), every later one
  CONCURRENTLY: analysts keep reading the
  previous snapshot meanwhile; the new one replaces it when the refresh commits. A concurrent
  refresh writes only the rows that changed: the rows hold nothing that changes at each refresh (the
  refresh time was a column of every row once, and each refresh rewrote them all).
- The refresh and its time commit in one transaction: a reader sees the new rows with the new time
  or the previous rows with the previous time, never one with the other.
- One refresh at a time: a session advisory lock keyed on the view itself (so schemas sharing a
  database do not exclude each other); a second refresh raises SnapshotBusy at once, it does not
  queue. The refresh runs with its own statement_timeout, REFRESH_TIMEOUT_SECONDS, whatever the
  role's or the DSN's (it is meant to run for minutes, never for ever), and waits for any one lock
  no longer than the lock timeout; then SnapshotLockTimeout names the sessions holding locks on our
  tables.
- REFRESH needs ownership of the view: it runs as the role that migrates the schema (the ETL role
  of database/roles.sql), which owns the time's table too; analysts only SELECT both.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg2
import psycopg2.errors

from database.connection import command_errors, first_line, one_row, open_connection
from database.errors import DatabaseError, DatabaseUnavailable
from database.schema import SNAPSHOT_REFRESHED as REFRESHED
from database.schema import SNAPSHOT_VIEW as VIEW
from database.schema import lock_holders

logger = logging.getLogger(__name__)

# The first key of the refresh's advisory lock (the second is the view's oid): any constant.
_REFRESH_LOCK_CLASS = 741_235_019
# The refresh's statement_timeout: minutes at 100M rows; past this something is wrong (the nightly
# Job's activeDeadlineSeconds, deploy/kubernetes/components/snapshot-cronjob, is above it).
REFRESH_TIMEOUT_SECONDS = 5400


class SnapshotBusy(DatabaseError):
    """Raised when another refresh of the snapshot is running; nothing was done (it refreshes it)."""


class SnapshotLockTimeout(DatabaseUnavailable):
    """Raised when the refresh waited longer than the lock timeout for a table (DDL holds it); rerun later."""


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What a refresh did: how (concurrently or, the first time, plainly), rows, seconds, refreshed_at."""

    concurrently: bool
    rows: int
    seconds: float
    refreshed_at: datetime  # when it started, as recorded in REFRESHED

    def summary(self) -> str:
        how = "concurrently" if self.concurrently else "for the first time"
        when = self.refreshed_at.isoformat()
        return f"snapshot {VIEW} refreshed {how}: {self.rows} rows in {self.seconds:.1f} s; refreshed_at {when}"


class SnapshotRefresher:
    """Refreshes the snapshot: plainly the first time, CONCURRENTLY afterwards; one at a time."""

    def __init__(
        self,
        dsn: str,
        *,
        lock_timeout_seconds: float = 5.0,
        connect_timeout_seconds: int = 5,
        statement_timeout_seconds: float = REFRESH_TIMEOUT_SECONDS,
    ) -> None:
        self._dsn = dsn
        self._lock_timeout_ms = max(1, int(lock_timeout_seconds * 1000))
        self._statement_timeout_ms = max(1, int(statement_timeout_seconds * 1000))
        self._connect_timeout = connect_timeout_seconds

    def __repr__(self) -> str:
        return "SnapshotRefresher()"  # the DSN may hold a password

    def _lock_timeout(self, holders: str = "") -> SnapshotLockTimeout:
        held = f" ({holders})" if holders else ""
        return SnapshotLockTimeout(
            f"the refresh waited {self._lock_timeout_ms} ms for a lock (a migration, retention or another "
            f"open transaction holds one){held}; the previous snapshot is kept, rerun later"
        )

    def run(self) -> RefreshResult:
        """Refresh; raise DatabaseError (not migrated), SnapshotBusy, SnapshotLockTimeout or DatabaseUnavailable."""
        conn = open_connection(self._dsn, connect_timeout=self._connect_timeout, application_name="login-etl-snapshot")
        conn.autocommit = True  # the lock is the session's (closing ends it); each statement commits alone
        # Refused: e.g. not the view's owner (only the ETL role may refresh it).
        with closing(conn), command_errors("snapshot refresh", lock_timeout=self._lock_timeout), conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)::oid::int, to_regclass(%s) IS NOT NULL", (VIEW, REFRESHED))
            oid, recorded = one_row(cur)
            if oid is None or not recorded:
                raise DatabaseError(
                    f"{VIEW} does not exist yet (schema 5): start the ETL once (it migrates the schema), "
                    "then run snapshot"
                )
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (_REFRESH_LOCK_CLASS, oid))
            if not one_row(cur)[0]:
                raise SnapshotBusy(
                    f"another refresh of {VIEW} is running (it holds the refresh lock): nothing done, "
                    "it refreshes the snapshot"
                )
            # A refresh reads one index entry per login kept (minutes at 100M): a long timeout, not none.
            cur.execute(
                f"SET statement_timeout = {self._statement_timeout_ms}; SET lock_timeout = {self._lock_timeout_ms}"
            )
            cur.execute("SELECT relispopulated FROM pg_class WHERE oid = %s", (oid,))
            populated = bool(one_row(cur)[0])
            started = time.monotonic()
            # One transaction, so the rows and their time are seen together; now() is its start,
            # when the refresh began (the time its rows are as of). Readers of the one-row table
            # do not wait for it (MVCC); only a refresh writes it, and refreshes take turns.
            cur.execute("BEGIN")
            try:
                cur.execute(f"REFRESH MATERIALIZED VIEW {'CONCURRENTLY ' if populated else ''}{VIEW}")
            except psycopg2.errors.LockNotAvailable:
                cur.execute("ROLLBACK")
                raise self._lock_timeout(lock_holders(cur)) from None
            cur.execute(
                f"""INSERT INTO {REFRESHED} (refreshed_at) VALUES (now())
                    ON CONFLICT (only_row) DO UPDATE SET refreshed_at = excluded.refreshed_at
                    RETURNING refreshed_at"""
            )
            refreshed_at = one_row(cur)[0]
            cur.execute("COMMIT")
            seconds = time.monotonic() - started
            cur.execute(f"SELECT count(*) FROM {VIEW}")
            rows = one_row(cur)[0]
        logger.info("refreshed %s: %d rows in %.1f s", VIEW, rows, seconds)
        return RefreshResult(populated, int(rows), seconds, refreshed_at)


def describe(dsn: str, *, connect_timeout_seconds: int = 5) -> str:
    """For `check`: the snapshot's age, or that it was never refreshed, or "" before schema 5 (reads only)."""
    conn = open_connection(dsn, connect_timeout=connect_timeout_seconds, application_name="login-etl-check")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT relispopulated, to_regclass(%s) IS NOT NULL FROM pg_class WHERE oid = to_regclass(%s)",
                (REFRESHED, VIEW),
            )
            row = cur.fetchone()
            if row is None:
                return ""
            populated, recorded = row
            if not recorded:  # unreleased schema 5's view, refreshed_at in its rows: remade at start
                return "; analysts' snapshot of an older schema 5: start the ETL once, then `python main.py snapshot`"
            if not populated:
                return "; analysts' snapshot never refreshed: run `python main.py snapshot`"
            cur.execute(f"SELECT refreshed_at FROM {REFRESHED}")
            found = cur.fetchone()
    except psycopg2.Error as exc:
        raise DatabaseUnavailable(first_line(exc)) from None
    finally:
        conn.close()
    if found is None:  # a REFRESH run by hand, not by `snapshot`: its time was not recorded
        return "; analysts' snapshot refreshed at an unknown time (not by `python main.py snapshot`)"
    refreshed_at = found[0]
    hours = (datetime.now(timezone.utc) - refreshed_at).total_seconds() / 3600
    return f"; analysts' snapshot refreshed {refreshed_at:%Y-%m-%d %H:%M} UTC ({hours:.1f} h ago)"
