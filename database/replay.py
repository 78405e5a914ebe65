"""Replayer: load the quarantined messages that today's validation accepts; audited before anything moves.

Order (the guarantee "no unaudited replay"):

1. Look: the selected quarantine rows (not replayed yet, optionally by reason pattern and
   quarantine time) are read, and each body is decrypted in memory and validated by `retry`
   (transform.retry_quarantined, wired by main.py): to load, still failing (with today's reason),
   or not decryptable with the keys held. Nothing is written, nothing of a body is kept.
2. Audit: one row in `etl_replay_audit` (who, why, the filter, the counts, the message ids; never a
   value), committed. If it cannot be committed, nothing else happens.
3. Move (not with --dry-run), in transactions of `batch_rows`: the audited rows still not replayed
   are locked (`FOR UPDATE`) and validated again (a row may have been rekeyed or replayed since);
   those that pass are inserted into `user_logins` unless their message_id is there already (under
   any day; ``ON CONFLICT (message_id, create_date) DO NOTHING`` settles a load at the same moment) and
   their quarantine rows get `replayed_at` and `replay_audit_id`; those that still fail get today's
   reason. Only audited message ids move.

Idempotent and safe beside the ETL and another replay: a replayed row is never selected again, the
insert does nothing for a message already loaded, and the row lock makes a second replay wait and
then skip what the first one moved. A replayed message is in `user_logins` and keeps its
quarantine row as history (`replayed_at` set): "one table per message" reads "in `user_logins` or
in the quarantine with `replayed_at IS NULL`, never both" (docs/operations-monitoring.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import connection as Connection
from psycopg2.extras import execute_values

from database.audit_tables import audit_table
from database.connection import command_errors, first_line, one_row, open_connection
from database.errors import DatabaseError
from database.schema import COLUMN_LIST, SCHEMA_VERSION
from database.sqs_postgres import PostgresWriter
from models import MaskedLogin

logger = logging.getLogger(__name__)

REPLAY_AUDIT_DDL = (Path(__file__).parent / "replay_audit.sql").read_text(encoding="utf-8")
# Any constant: serialises the creation of the audit table by two first replays at once.
_REPLAY_AUDIT_LOCK_ID = 7_412_350_193

# `retry(message_id, encrypted_body, sent_at)`: the row to load, or why it still fails (a safe
# reason); raises ValueError (with a safe reason) when the body does not decrypt.
Retry = Callable[[str, str, "datetime | None"], "MaskedLogin | str"]


class ReplayNotAudited(DatabaseError):
    """Raised when the audit row could not be committed; nothing was changed."""


class ReplayInterrupted(DatabaseError):
    """Raised when PostgreSQL failed after the audit; committed batches are kept, a rerun resumes."""


class ReplaySchemaBehind(DatabaseError):
    """Raised when a dry run finds the schema not created or older than this release's (its text says which)."""


def require_current_schema(writer: PostgresWriter) -> None:
    """Connect without migrating and raise ReplaySchemaBehind unless the schema is this release's.

    A dry run changes nothing, the schema included: it looks, and stops if the schema is behind
    (replayed_at and the replay view come with the current schema).
    """
    writer.connect(migrate=False)
    version = writer.schema_version()
    if version is None:
        raise ReplaySchemaBehind("not created")
    if version < SCHEMA_VERSION:
        raise ReplaySchemaBehind(f"at version {version}, this release's is {SCHEMA_VERSION}")


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """What the operator asked for: who, why, which quarantine rows, and whether to change anything."""

    requested_by: str
    reason: str
    where_reason: str | None = None  # an ILIKE pattern on user_logins_rejected.reason
    since: datetime | None = None  # quarantined (received_at) at or after
    dry_run: bool = False


@dataclass(slots=True)
class ReplayResult:
    """What a replay found and did, by outcome; reasons are safe texts, never values."""

    audit_id: int = 0
    examined: int = 0
    to_load: int = 0
    loaded: int = 0
    already_loaded: int = 0
    still_failing: Counter[str] = field(default_factory=Counter)
    undecryptable: Counter[str] = field(default_factory=Counter)
    skipped: int = 0  # audited, then replayed by someone else or gone before this run got to it

    def lines(self, dry_run: bool) -> list[str]:
        """The report printed by `replay`: counts by outcome, then by reason."""
        head = (
            f"dry run: {self.examined} quarantined messages examined, nothing changed (audit id {self.audit_id})"
            if dry_run
            else f"replay: {self.examined} quarantined messages examined (audit id {self.audit_id})"
        )
        lines = [head]
        if dry_run:
            lines.append(f"  would load into user_logins: {self.to_load}")
        else:
            lines.append(f"  loaded into user_logins: {self.loaded} (already there: {self.already_loaded})")
            if self.skipped:
                lines.append(f"  skipped (replayed or removed meanwhile): {self.skipped}")
        label = "would stay quarantined" if dry_run else "still failing, left quarantined with today's reason"
        lines.append(f"  {label}: {sum(self.still_failing.values())}")
        lines += [f"    {count:>6}  {reason}" for reason, count in self.still_failing.most_common()]
        lines.append(f"  not decryptable with the keys held: {sum(self.undecryptable.values())}")
        lines += [f"    {count:>6}  {reason}" for reason, count in self.undecryptable.most_common()]
        return lines


class Replayer:
    """Replays rows of `user_logins_rejected` into `user_logins` (see the module docstring)."""

    def __init__(self, dsn: str, retry: Retry, *, batch_rows: int = 500, connect_timeout_seconds: int = 5) -> None:
        self._dsn = dsn
        self._retry = retry
        self._batch_rows = max(1, batch_rows)
        self._connect_timeout = connect_timeout_seconds

    def __repr__(self) -> str:
        return "Replayer()"  # the DSN may hold a password

    def run(self, request: ReplayRequest) -> ReplayResult:
        """Look, audit, then (unless a dry run) move. Raises DatabaseUnavailable (nothing done),
        ReplayNotAudited (nothing changed), ReplayInterrupted (lost after the audit) or DatabaseError."""
        conn = open_connection(self._dsn, connect_timeout=self._connect_timeout, application_name="login-etl-replay")
        # Refused: e.g. no right on the tables, the schema behind.
        with closing(conn), command_errors("replay"):
            result = ReplayResult()
            to_load, examined = self._look(conn, request, result)
            result.audit_id = self._audit(conn, request, result, to_load, examined)
            logger.info(
                "replay audited (id %d): %d messages examined, %d to load",
                result.audit_id,
                result.examined,
                result.to_load,
                extra={"count": result.examined},
            )
            if not request.dry_run:
                try:
                    self._move(conn, result, examined)
                except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                    raise ReplayInterrupted(
                        f"replay stopped ({exc.pgcode or type(exc).__name__}: {first_line(exc)})"
                    ) from None
            return result

    # -- 1. look --------------------------------------------------------------------------------

    def _look(self, conn: Connection, request: ReplayRequest, result: ReplayResult) -> tuple[list[str], list[str]]:
        """Classify the selected rows; return (ids to load, every id examined)."""
        to_load: list[str] = []
        examined: list[str] = []
        with conn:
            with conn.cursor() as cur:
                cur.execute("SELECT to_regclass('user_logins_rejected') IS NOT NULL")
                if not one_row(cur)[0]:
                    return to_load, examined  # nothing was ever quarantined here
            for message_id, body, sent_at in self._select(conn, request):
                result.examined += 1
                examined.append(message_id)
                if isinstance(self._classify(message_id, body, sent_at, result), MaskedLogin):
                    to_load.append(message_id)
                    result.to_load += 1
        return to_load, examined

    def _select(self, conn: Connection, request: ReplayRequest) -> Iterator[tuple[str, str, datetime | None]]:
        # A named (server-side) cursor: the quarantine may be large, only a page is in memory.
        with conn.cursor(name="replay_select") as cur:
            cur.itersize = 1000
            cur.execute(
                """SELECT message_id, encrypted_body, sent_at FROM user_logins_rejected
                    WHERE replayed_at IS NULL
                      AND (%(pattern)s::text IS NULL OR reason ILIKE %(pattern)s)
                      AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s)
                    ORDER BY received_at, message_id""",
                {"pattern": request.where_reason, "since": request.since},
            )
            yield from cur

    def _classify(
        self, message_id: str, body: str, sent_at: datetime | None, result: ReplayResult
    ) -> MaskedLogin | str | None:
        """The row to load, today's reason, or None (not decryptable; counted)."""
        try:
            outcome = self._retry(message_id, body, sent_at)
        except ValueError as exc:  # UnmaskError: a version not held, a damaged token
            result.undecryptable[str(exc)] += 1
            return None
        if isinstance(outcome, str):
            result.still_failing[outcome] += 1
        return outcome

    # -- 2. audit -------------------------------------------------------------------------------

    def _audit(
        self,
        conn: Connection,
        request: ReplayRequest,
        result: ReplayResult,
        to_load: Sequence[str],
        examined: Sequence[str],
    ) -> int:
        try:
            with conn, conn.cursor() as cur:
                table = audit_table(cur, "etl_replay_audit", REPLAY_AUDIT_DDL, _REPLAY_AUDIT_LOCK_ID)
                cur.execute(
                    sql.SQL(
                        """INSERT INTO {}
                           (requested_by, reason, dry_run, where_reason, since, examined_count, to_load_count,
                            still_failing_count, undecryptable_count, message_ids, to_load_ids)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id"""
                    ).format(table),
                    (
                        request.requested_by,
                        request.reason,
                        request.dry_run,
                        request.where_reason,
                        request.since,
                        result.examined,
                        len(to_load),
                        sum(result.still_failing.values()),
                        sum(result.undecryptable.values()),
                        list(examined),
                        list(to_load),
                    ),
                )
                return int(one_row(cur)[0])
        except psycopg2.Error as exc:
            code = exc.pgcode or type(exc).__name__
            raise ReplayNotAudited(f"the audit row was not written ({code}: {first_line(exc)})") from None

    # -- 3. move --------------------------------------------------------------------------------

    def _move(self, conn: Connection, result: ReplayResult, audited: Sequence[str]) -> None:
        result.still_failing.clear()  # counted again from what the locked rows say now
        result.undecryptable.clear()
        for start in range(0, len(audited), self._batch_rows):
            chunk = audited[start : start + self._batch_rows]
            with conn, conn.cursor() as cur:  # one transaction per chunk
                cur.execute(
                    """SELECT message_id, encrypted_body, sent_at FROM user_logins_rejected
                        WHERE message_id = ANY(%s) AND replayed_at IS NULL ORDER BY message_id FOR UPDATE""",
                    (list(chunk),),
                )
                rows = cur.fetchall()
                result.skipped += len(chunk) - len(rows)
                logins: list[MaskedLogin] = []
                reasons: list[tuple[str, str]] = []
                for message_id, body, sent_at in rows:
                    outcome = self._classify(message_id, body, sent_at, result)
                    if isinstance(outcome, MaskedLogin):
                        logins.append(outcome)
                    elif outcome is not None:
                        reasons.append((message_id, outcome))
                if logins:
                    self._load(cur, logins, result)
                if reasons:
                    execute_values(
                        cur,
                        """UPDATE user_logins_rejected AS r SET reason = v.reason
                                             FROM (VALUES %s) AS v (message_id, reason)
                                            WHERE r.message_id = v.message_id AND r.reason <> v.reason""",
                        reasons,
                        page_size=len(reasons),
                    )
            logger.info(
                "replay: %d of %d audited messages done, %d loaded",
                min(start + len(chunk), len(audited)),
                len(audited),
                result.loaded,
                extra={"count": result.loaded},
            )

    def _load(self, cur: Any, logins: Sequence[MaskedLogin], result: ReplayResult) -> None:
        # Not for a message already stored under any day: a quarantine row without a sent time
        # (the minimal form) would give the login the undated day, beside its real one. Between
        # two loads at once, the unique key decides: the second waits, then inserts nothing.
        inserted = execute_values(
            cur,
            f"""INSERT INTO user_logins ({COLUMN_LIST})
                SELECT {COLUMN_LIST} FROM (VALUES %s) AS v ({COLUMN_LIST})
                 WHERE NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id = v.message_id)
                ON CONFLICT (message_id, create_date) DO NOTHING RETURNING message_id""",
            [
                (
                    r.message_id,
                    r.user_id,
                    r.device_type,
                    r.masked_ip,
                    r.masked_device_id,
                    r.app_version,
                    r.create_date,
                    r.locale,
                    r.masked_network,
                )
                for r in logins
            ],
            template="(%s, %s, %s, %s, %s, %s, %s::date, %s::text, %s::text)",
            page_size=len(logins),
            fetch=True,
        )
        result.loaded += len(inserted)
        result.already_loaded += len(logins) - len(inserted)
        # Loaded now or before: either way the message is in user_logins; its quarantine row is history.
        cur.execute(
            """UPDATE user_logins_rejected SET replayed_at = now(), replay_audit_id = %s
                        WHERE message_id = ANY(%s)""",
            (result.audit_id, [r.message_id for r in logins]),
        )
