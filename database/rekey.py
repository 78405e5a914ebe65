"""Rekeyer: rewrite stored tokens of older key versions (or of the legacy format) under the active key, batch by batch.

A token is current when its text starts with one of the active key's prefixes (Tink tokens carry
their key id in their first bytes, so seven base64 characters tell); every other token, including
the legacy ``v<n>.`` ones of any version, is rewritten.

How (and why it is safe to kill and to run beside the ETL):

- Each table (each partition of a partitioned one, since `ctid` is per partition; and a legacy
  table that a migration to partitions has not finished moving) is walked in ranges of physical
  pages (``ctid`` ranges, read by a TID range scan),
  one transaction per range: ``SELECT … FOR UPDATE SKIP LOCKED`` the rows holding a token not of
  the active version, re-make those tokens, ``UPDATE`` them by ``ctid``, ``COMMIT``. Rows with a
  NULL ``message_id`` (the original exercise's rows) are found like any other.
- Resumable: progress is the data itself. A killed run loses its open batch (rolled back); a rerun
  skips every row already of the active version and carries on.
- Beside the ETL: the ETL only inserts (new rows are already of the active version once it runs
  with the new keyring) and never locks existing rows; rows locked by anyone else are skipped and
  taken in a later pass.
- A token that cannot be rewritten (its version is not held, or not a token at all) is left as it
  is and counted by reason; the run then ends with tokens remaining.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg2
from psycopg2.extensions import connection as Connection

from database.connection import first_line, one_row, open_connection
from database.errors import DatabaseError
from database.page_walk import Row, leaves, walk_pages
from models import Backoff

logger = logging.getLogger(__name__)

# The masked columns of each table. `retoken` recovers each token's field from the token itself.
MASKED_COLUMNS: dict[str, tuple[str, ...]] = {
    "user_logins": ("masked_ip", "masked_device_id", "masked_network"),
    "user_logins_rejected": ("encrypted_body",),
}
MAX_PASSES = 5  # a pass after the first only picks up rows that were locked by others


class RekeyInterrupted(DatabaseError):
    """Raised when PostgreSQL failed mid-run; the batches committed so far are kept, rerun to resume."""


@dataclass(slots=True)
class RekeyResult:
    """What a run did: rows and tokens rewritten, tokens it could not rewrite (by reason), tokens left."""

    rows: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    remaining: int = 0

    def summary(self, version: int) -> str:
        tables = ", ".join(f"{table} {count}" for table, count in self.rows.items()) or "none"
        return (
            f"rekeyed {self.tokens} tokens to version {version} (rows rewritten: {tables}); "
            f"{self.remaining} tokens of other versions left"
        )


# Each statement of a rekey (a page of UPDATEs, a count) ends within this, lock waits included (a
# row an open transaction holds): the run stops with RekeyInterrupted and a rerun resumes.
STATEMENT_TIMEOUT_SECONDS = 300.0


class Rekeyer:
    """Rewrites old-version tokens in `user_logins` and `user_logins_rejected`.

    `retoken(token)` returns the token re-made under the active key, or raises ValueError with a
    safe reason (never the value) when it cannot. `backoff` paces the passes that find only rows
    locked by others (the process's one policy, passed in by main.py); `sleep` is injectable.
    """

    def __init__(
        self,
        dsn: str,
        retoken: Callable[[str], str],
        *,
        current_prefixes: tuple[str, ...],
        batch_rows: int = 500,
        connect_timeout_seconds: int = 5,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        lengths = {len(prefix) for prefix in current_prefixes}
        if len(lengths) != 1:
            raise ValueError("current_prefixes must be non-empty and of one length")
        self._dsn = dsn
        self._retoken = retoken
        self._prefixes = tuple(current_prefixes)
        self._prefix_chars = lengths.pop()
        self._batch_rows = max(1, batch_rows)
        self._connect_timeout = connect_timeout_seconds
        self._backoff = backoff or Backoff()
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"Rekeyer(prefixes={self._prefixes!r})"  # the DSN may hold a password

    def run(self) -> RekeyResult:
        """Rewrite every table; raise DatabaseUnavailable (at start), RekeyInterrupted (lost mid-run) or
        DatabaseError (refused, e.g. no UPDATE right)."""
        conn = open_connection(
            self._dsn,
            connect_timeout=self._connect_timeout,
            application_name="login-etl-rekey",
            statement_timeout_seconds=STATEMENT_TIMEOUT_SECONDS,
        )
        result = RekeyResult()
        try:
            for table, columns in MASKED_COLUMNS.items():
                for leaf in leaves(conn, table):
                    present = _present(conn, leaf, columns)  # the legacy table mid-move has no masked_network
                    result.remaining += self._table(conn, leaf, present, result, label=table)
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            raise RekeyInterrupted(f"rekey stopped ({exc.pgcode or type(exc).__name__}: {first_line(exc)})") from None
        except psycopg2.Error as exc:  # not an outage: e.g. a role without UPDATE on the tables
            raise DatabaseError(f"rekey refused by PostgreSQL ({exc.pgcode}: {first_line(exc)})") from None
        finally:
            conn.close()
        return result

    def _table(self, conn: Connection, table: str, columns: tuple[str, ...], result: RekeyResult, label: str) -> int:
        """Pass over a table until nothing rewritable is left; return the tokens of other versions left."""
        result.rows[label] += 0  # listed in the summary even when nothing needed rewriting
        for attempt in range(1, MAX_PASSES + 1):
            failures: Counter[str] = Counter()
            rewritten = self._pass(conn, table, columns, result, failures)
            result.rows[label] += rewritten
            left = self._count_old(conn, table, columns)
            logger.info(
                "rekey %s: pass %d rewrote %d rows; %d tokens of other versions left", table, attempt, rewritten, left
            )
            if left <= sum(failures.values()) or attempt == MAX_PASSES:
                break  # done, or only tokens that cannot be rewritten are left
            if rewritten == 0:
                # Rows locked by another transaction (or new old-version rows): wait, then retry.
                self._sleep(self._backoff.delay(attempt))
        result.failures.update(failures)
        return left

    def _pass(
        self,
        conn: Connection,
        table: str,
        columns: tuple[str, ...],
        result: RekeyResult,
        failures: Counter[str],
    ) -> int:
        def rewrite(row: Row) -> Row | None:
            row_ctid, *tokens = row
            new = [self._rewrite(token, failures) for token in tokens]
            if new == tokens:
                return None
            result.tokens += sum(a != b for a, b in zip(new, tokens, strict=True))
            return (row_ctid, *new)

        needs = " OR ".join(f"({c} IS NOT NULL AND left({c}, %(n)s) <> ALL(%(prefixes)s))" for c in columns)
        sets = ", ".join(f"{c} = v.{c}" for c in columns)
        return walk_pages(
            conn,
            table,
            select=(
                f"SELECT ctid::text, {', '.join(columns)} FROM {table} "
                f"WHERE ctid >= %(start)s::tid AND ctid < %(end)s::tid AND ({needs}) FOR UPDATE SKIP LOCKED"
            ),
            update=(
                f"UPDATE {table} AS t SET {sets} FROM (VALUES %s) AS v(row_ctid, {', '.join(columns)}) "
                "WHERE t.ctid = v.row_ctid::tid"
            ),
            change=rewrite,
            batch_rows=self._batch_rows,
            params={"n": self._prefix_chars, "prefixes": list(self._prefixes)},
            follow_growth=True,  # the ETL may add pages meanwhile
            progress=lambda page, pages, done: logger.info(
                "rekey %s: page %d of %d, %d rows rewritten", table, page, pages, done
            ),
        )

    def _rewrite(self, token: str | None, failures: Counter[str]) -> str | None:
        if token is None or token.startswith(self._prefixes):
            return token
        try:
            return self._retoken(token)
        except ValueError as exc:
            failures[str(exc)] += 1
            return token

    def _count_old(self, conn: Connection, table: str, columns: tuple[str, ...]) -> int:
        terms = " + ".join(
            f"count(*) FILTER (WHERE {c} IS NOT NULL AND left({c}, %(n)s) <> ALL(%(prefixes)s))" for c in columns
        )
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT {terms} FROM {table}", {"n": self._prefix_chars, "prefixes": list(self._prefixes)})
            return int(one_row(cur)[0])


def _present(conn: Connection, table: str, columns: tuple[str, ...]) -> tuple[str, ...]:
    """The ones of `columns` that `table` has, in order."""
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped""",
            (table,),
        )
        have = {row[0] for row in cur.fetchall()}
    return tuple(column for column in columns if column in have)
