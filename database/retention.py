"""Retention: drop the daily partitions of `user_logins` older than N days, audited.

Storing personal data only as long as it is needed is a privacy requirement (docs/partitions.md).
Dropping a whole partition is instant and leaves no bloat, unlike a DELETE. What is kept: today,
and the `keep_days` full days before it (so yesterday, which still receives late messages, and the
partitions created ahead are never touched). Rows older than that elsewhere are deleted too: those
in the default partition (a SentTimestamp long past) and quarantined messages in
`user_logins_rejected` (by received_at), which is small and not partitioned.

Two things are never removed, because their removal could not be undone by the ETL:
- Undated rows (no SentTimestamp: create_date 1970-01-01, or the original exercise's NULL): their
  date says nothing of their age, so they are kept and counted in the summary, not deleted.
- A day SQS may still redeliver: SQS keeps a message up to 14 days after it was sent, and a message
  redelivered after its day was dropped would be stored again (its partition and its unique index
  are gone). `keep_days` below MIN_KEEP_DAYS is refused unless `allow_redelivered_days` is set.

Each drop or delete commits together with its row in `etl_retention_audit` (who, when, the cutoff,
what, how many rows): nothing is removed without its audit row. `dry_run` only reports.
"""

from __future__ import annotations

import logging
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from database import partitions
from database.audit_tables import audit_table
from database.connection import command_errors, one_row, open_connection
from database.errors import DatabaseError, DatabaseUnavailable
from models import UNDATED_CREATE_DATE

logger = logging.getLogger(__name__)

RETENTION_AUDIT_DDL = (Path(__file__).parent / "retention_audit.sql").read_text(encoding="utf-8")
# Any constant: serialises the creation of the audit table by two first runs at once.
_RETENTION_AUDIT_LOCK_ID = 7_412_350_194
DELETE_BATCH_ROWS = 10_000
# The longest an SQS queue keeps a message (MessageRetentionPeriod <= 1,209,600 s, 14 days:
# https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SetQueueAttributes.html).
SQS_MAX_RETENTION_SECONDS = 1_209_600
# A message sent on day D may be redelivered until D + 14 days, i.e. still on today's date when
# D = today - 14: keep_days >= 14 keeps that day; one more day covers a message in hand at its
# expiry (committed after midnight) and clock skew between SQS and this host.
MIN_KEEP_DAYS = SQS_MAX_RETENTION_SECONDS // 86_400 + 1


class RetentionBusy(DatabaseUnavailable):
    """Raised when a drop waited longer than the lock timeout (a long query holds the table); rerun later."""


class RetentionTooShort(DatabaseError):
    """Raised when keep_days could drop a day SQS may still redeliver, without the explicit override."""


@dataclass(slots=True)
class RetentionResult:
    """What a run dropped (or would drop, in a dry run): (partition, rows) and the other rows deleted."""

    cutoff: date
    dry_run: bool
    partitions: list[tuple[str, int]] = field(default_factory=list)
    default_rows: int = 0
    rejected_rows: int = 0
    undated_rows: int = 0

    def summary(self) -> str:
        verb = "would drop" if self.dry_run else "dropped"
        rows = sum(n for _, n in self.partitions)
        names = ", ".join(name for name, _ in self.partitions) or "none"
        return (
            f"retention (rows before {self.cutoff}): {verb} {len(self.partitions)} partition(s) of user_logins "
            f"({rows} rows: {names}); {'would delete' if self.dry_run else 'deleted'} "
            f"{self.default_rows} rows of {partitions.DEFAULT_PARTITION} and {self.rejected_rows} of "
            f"user_logins_rejected; kept {self.undated_rows} undated rows (no SentTimestamp: their age is unknown)"
        )


class Retention:
    """Drops what is older than `keep_days` full days before today (UTC)."""

    def __init__(
        self,
        dsn: str,
        *,
        keep_days: int,
        requested_by: str,
        allow_redelivered_days: bool = False,
        today: date | None = None,
        lock_timeout_seconds: float = 5.0,
        connect_timeout_seconds: int = 5,
    ) -> None:
        if keep_days < 1:
            raise ValueError("keep_days must be >= 1: today and yesterday are never dropped")
        if keep_days < MIN_KEEP_DAYS and not allow_redelivered_days:
            raise RetentionTooShort(
                f"--keep-days {keep_days} could drop a day SQS may still redeliver (it keeps messages up to "
                f"{SQS_MAX_RETENTION_SECONDS // 86_400} days, and a message redelivered after its day was "
                f"dropped is stored again): use --keep-days {MIN_KEEP_DAYS} or more, or add "
                "--allow-redelivered-days if no queue keeps messages that long"
            )
        self._dsn = dsn
        self._keep_days = keep_days
        self._requested_by = requested_by
        self._today = today or partitions.utc_today()
        self._lock_timeout_ms = max(1, int(lock_timeout_seconds * 1000))
        self._connect_timeout = connect_timeout_seconds
        self._audit_table: sql.Composable = sql.Identifier("etl_retention_audit")

    def __repr__(self) -> str:
        return f"Retention(keep_days={self._keep_days})"  # the DSN may hold a password

    @property
    def cutoff(self) -> date:
        """The oldest day kept."""
        return self._today - timedelta(days=self._keep_days)

    def _busy(self) -> RetentionBusy:
        return RetentionBusy(
            f"a drop waited {self._lock_timeout_ms} ms for a lock on user_logins (a long query "
            "or open transaction holds it); what was dropped so far is audited, rerun later"
        )

    def run(self, *, dry_run: bool) -> RetentionResult:
        """Drop (or, in a dry run, list) what is older than the cutoff; raise DatabaseError."""
        conn = open_connection(self._dsn, connect_timeout=self._connect_timeout, application_name="login-etl-retention")
        result = RetentionResult(self.cutoff, dry_run)
        with closing(conn), command_errors("retention", lock_timeout=self._busy):
            if not dry_run:  # AuditTableUnsafe: main.py says to run roles.sql; nothing dropped
                with conn, conn.cursor() as cur:
                    self._audit_table = audit_table(
                        cur, "etl_retention_audit", RETENTION_AUDIT_DDL, _RETENTION_AUDIT_LOCK_ID
                    )
            with conn, conn.cursor() as cur:
                if partitions.relkind(cur, partitions.TABLE) != "p":
                    raise DatabaseError(
                        "user_logins is not partitioned yet: start the ETL once (it migrates the "
                        "table), then run retention"
                    )
                old = sorted(
                    (day, name) for name, day in _daily(cur) if day < self.cutoff and day != UNDATED_CREATE_DATE
                )
            for _day, name in old:
                result.partitions.append((name, self._drop(conn, name, dry_run)))
            result.default_rows = self._delete(conn, partitions.DEFAULT_PARTITION, "create_date", dry_run)
            result.rejected_rows = self._delete(conn, "user_logins_rejected", "received_at", dry_run)
            result.undated_rows = _undated(conn)
        return result

    def _drop(self, conn: psycopg2.extensions.connection, name: str, dry_run: bool) -> int:
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {name}")
            rows = int(one_row(cur)[0])
            if dry_run:
                return rows
            cur.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
            cur.execute(f"DROP TABLE {name}")
            self._audit(cur, "drop partition", name, rows)
        logger.info("retention: dropped %s (%d rows)", name, rows)
        return rows

    def _delete(self, conn: psycopg2.extensions.connection, table: str, column: str, dry_run: bool) -> int:
        """Delete rows of `table` older than the cutoff in batches, each audited; return how many."""
        if column == "create_date":  # undated rows (1970-01-01) are not old, only of unknown age: kept
            older, params = f"{column} < %s AND {column} <> %s", [self.cutoff, UNDATED_CREATE_DATE]
        else:
            older, params = f"{column} < %s", [datetime.combine(self.cutoff, datetime.min.time(), timezone.utc)]
        total = 0
        while True:
            with conn, conn.cursor() as cur:
                if dry_run:
                    cur.execute(f"SELECT count(*) FROM {table} WHERE {older}", params)
                    return int(one_row(cur)[0])
                cur.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
                cur.execute(
                    f"""DELETE FROM {table} WHERE ctid = ANY (ARRAY(
                                   SELECT ctid FROM {table} WHERE {older} LIMIT %s))""",
                    (*params, DELETE_BATCH_ROWS),
                )
                deleted = cur.rowcount
                if deleted:
                    self._audit(cur, "delete rows", table, deleted)
            total += deleted
            if deleted < DELETE_BATCH_ROWS:
                if total:
                    logger.info("retention: deleted %d rows of %s", total, table)
                return total

    def _audit(self, cur: Cursor, action: str, what: str, rows: int) -> None:
        cur.execute(
            sql.SQL(
                """INSERT INTO {} (requested_by, keep_days, cutoff, action, object, rows)
                   VALUES (%s, %s, %s, %s, %s, %s)"""
            ).format(self._audit_table),
            (self._requested_by, self._keep_days, self.cutoff, action, what, rows),
        )


def _undated(conn: psycopg2.extensions.connection) -> int:
    """Rows of the default partition without a date of their own (kept by every run)."""
    with conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT count(*) FROM {partitions.DEFAULT_PARTITION} WHERE create_date IS NULL OR create_date = %s",
            (UNDATED_CREATE_DATE,),
        )
        return int(one_row(cur)[0])


def _daily(cur: Cursor) -> list[tuple[str, date]]:
    cur.execute(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                    WHERE i.inhparent = to_regclass(%s)""",
        (partitions.TABLE,),
    )
    return [(name, day) for (name,) in cur.fetchall() if (day := partitions.day_of(name)) is not None]
