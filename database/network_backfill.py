"""NetworkBackfill: give the rows stored before schema 7 their network token, batch by batch
(`python main.py backfill-networks`; docs/keys-and-privacy.md).

A row lacks its network token when `masked_network` is NULL and `masked_ip` is a Tink token of an IP
address: it starts with "A" (Tink's prefix byte 0x01) and is IP_TOKEN_CHARS long (an address is 16
bytes of plaintext; any other value is padded to 32 bytes or more, so its token is longer and it has
no network: NULL is then its right value). Legacy ``v<n>.`` ip tokens are not read here: `rekey`
turns them into Tink tokens first, then a backfill fills them. The token is computed by
`network_of(ip_token)` (main.py passes Masker.network_of_token: it needs the key).

The walk is the one rekey makes (database/page_walk.py): each partition in ranges of physical pages, one transaction
per range (``SELECT … FOR UPDATE SKIP LOCKED`` the rows lacking it, compute, ``UPDATE`` by ``ctid``,
``COMMIT``). Resumable: progress is the data itself, so a run stopped anywhere keeps its committed
ranges and a rerun carries on with the rows still lacking. Safe beside the ETL (which only inserts
rows that have their network token already) and beside `rekey` (rows locked by one are skipped by
the other and taken in a later pass).
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
from database.errors import DatabaseError, DatabaseUnavailable
from database.page_walk import Row, leaves, walk_pages
from models import Backoff

logger = logging.getLogger(__name__)

TABLE = "user_logins"
# The length of every Tink ip token of an IP address: base64 of 5 + 16 + 16 bytes (docs/tink-tokens.md).
IP_TOKEN_CHARS = 52
LACKING = f"masked_network IS NULL AND left(masked_ip, 1) = 'A' AND length(masked_ip) = {IP_TOKEN_CHARS}"
LEGACY = "masked_network IS NULL AND left(masked_ip, 1) = 'v'"
MAX_PASSES = 5  # a pass after the first only picks up rows that were locked by others


class BackfillInterrupted(DatabaseError):
    """Raised when PostgreSQL failed mid-run; the batches committed so far are kept, rerun to resume."""


@dataclass(slots=True)
class BackfillResult:
    """What a run did: rows given their network token, tokens it could not read (by reason), rows left."""

    rows: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    remaining: int = 0
    legacy: int = 0

    def summary(self) -> str:
        legacy = (
            f"; {self.legacy} rows hold a legacy v<n>. ip token: run `python main.py rekey`, then this again"
            if self.legacy
            else ""
        )
        return f"network tokens: {self.rows} rows filled; {self.remaining} rows still lack one{legacy}"


class NetworkBackfill:
    """Fills `masked_network` of the rows that lack it (see the module docstring).

    `network_of(ip_token)` returns the network token, or None if the token holds no address, or
    raises ValueError with a safe reason (never the value) when it cannot open it.
    """

    def __init__(
        self,
        dsn: str,
        network_of: Callable[[str], str | None],
        *,
        batch_rows: int = 500,
        connect_timeout_seconds: int = 5,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._dsn = dsn
        self._network_of = network_of
        self._batch_rows = max(1, batch_rows)
        self._connect_timeout = connect_timeout_seconds
        self._backoff = backoff or Backoff()
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"NetworkBackfill(batch_rows={self._batch_rows})"  # the DSN may hold a password

    def run(self) -> BackfillResult:
        """Fill every partition; raise DatabaseUnavailable (at start), BackfillInterrupted (lost
        mid-run) or DatabaseError (refused, e.g. no UPDATE right, or the schema before 7)."""
        conn = open_connection(
            self._dsn, connect_timeout=self._connect_timeout, application_name="login-etl-backfill-networks"
        )
        result = BackfillResult()
        try:
            for leaf in leaves(conn, TABLE):
                if leaf == "user_logins_legacy":
                    continue  # moved into the partitions by the ETL's migration, then filled here
                result.remaining += self._table(conn, leaf, result)
            result.legacy = count_where(conn, LEGACY)
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            raise BackfillInterrupted(
                f"backfill stopped ({exc.pgcode or type(exc).__name__}: {first_line(exc)})"
            ) from None
        except psycopg2.Error as exc:
            raise DatabaseError(f"backfill refused by PostgreSQL ({exc.pgcode}: {first_line(exc)})") from None
        finally:
            conn.close()
        return result

    def _table(self, conn: Connection, table: str, result: BackfillResult) -> int:
        """Pass over a partition until nothing fillable is left; return the rows still lacking."""
        left = 0
        for attempt in range(1, MAX_PASSES + 1):
            failures: Counter[str] = Counter()
            filled = self._pass(conn, table, result, failures)
            with conn, conn.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {table} WHERE {LACKING}")
                left = int(one_row(cur)[0])
            if filled or left:
                logger.info("backfill %s: pass %d filled %d rows; %d still lack one", table, attempt, filled, left)
            if left <= sum(failures.values()) or attempt == MAX_PASSES:
                result.failures.update(failures)
                break
            if filled == 0:  # rows locked by another transaction (a rekey, a replay): wait, then retry
                self._sleep(self._backoff.delay(attempt))
        return left

    def _pass(self, conn: Connection, table: str, result: BackfillResult, failures: Counter[str]) -> int:
        def fill(row: Row) -> Row | None:
            row_ctid, ip_token = row
            try:
                network = self._network_of(ip_token)
            except ValueError as exc:
                failures[str(exc)] += 1
                return None
            return None if network is None else (row_ctid, network)

        filled = walk_pages(
            conn,
            table,
            select=(
                f"SELECT ctid::text, masked_ip FROM {table} "
                f"WHERE ctid >= %(start)s::tid AND ctid < %(end)s::tid AND {LACKING} FOR UPDATE SKIP LOCKED"
            ),
            update=(
                f"UPDATE {table} AS t SET masked_network = v.network FROM (VALUES %s) AS v(row_ctid, network) "
                "WHERE t.ctid = v.row_ctid::tid"
            ),
            change=fill,
            batch_rows=self._batch_rows,
            progress=lambda page, pages, done: logger.info(
                "backfill %s: page %d of %d, %d rows filled", table, page, pages, done
            ),
        )
        result.rows += filled
        return filled


def count_where(conn: Connection, condition: str) -> int:
    """Rows of user_logins meeting `condition` (LACKING or LEGACY); 0 before schema 7 has the column."""
    with conn, conn.cursor() as cur:
        cur.execute(
            """SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'masked_network'
                  AND NOT attisdropped""",
            (TABLE,),
        )
        if cur.fetchone() is None:
            return 0
        cur.execute(f"SELECT count(*) FROM {TABLE} WHERE {condition}")
        return int(one_row(cur)[0])


def lacking(dsn: str, *, connect_timeout_seconds: int = 5) -> int:
    """For `check`: how many rows still lack their network token (reads only; a scan of the table)."""
    conn = open_connection(dsn, connect_timeout=connect_timeout_seconds, application_name="login-etl-check")
    try:
        return count_where(conn, LACKING)
    except psycopg2.Error as exc:
        raise DatabaseUnavailable(first_line(exc)) from None
    finally:
        conn.close()
