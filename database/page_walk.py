"""A table walked in ranges of physical pages, one transaction per range: how `rekey` and
`backfill-networks` change stored rows beside the ETL (database/rekey.py says why that is safe).

Each range: ``SELECT ctid, … FOR UPDATE SKIP LOCKED`` the rows wanted (a TID range scan), change
them in Python, ``UPDATE`` them by ``ctid``, ``COMMIT``. A partitioned table is walked leaf by leaf
(`leaves`): a ``ctid`` is per partition.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from psycopg2.extensions import connection as Connection
from psycopg2.extras import execute_values

from database.connection import one_row

PROGRESS_EVERY_SECONDS = 2.0

Row = tuple[Any, ...]


def walk_pages(
    conn: Connection,
    table: str,
    *,
    select: str,
    update: str,
    change: Callable[[Row], Row | None],
    batch_rows: int,
    progress: Callable[[int, int, int], None],
    params: Mapping[str, object] | None = None,
    follow_growth: bool = False,
) -> int:
    """One pass over `table`; return the rows changed.

    Ranges of the pages that hold about `batch_rows` rows. `select` is bound with the range
    (``%(start)s``, ``%(end)s``: tids) and `params`, and returns each row's ctid first; `change`
    gives a row's new values (its ctid first) or None to leave it; `update` writes them
    (execute_values' ``VALUES %s``). `follow_growth`: read the table's size again after each range,
    so that pages added meanwhile (by the ETL) are walked too. `progress(page, pages, changed)`
    every PROGRESS_EVERY_SECONDS.
    """
    pages, rows = size(conn, table)
    step = max(1, batch_rows * max(pages, 1) // max(rows, 1))  # pages holding ~batch_rows rows
    start, changed_rows, last_log = 0, 0, time.monotonic()
    while start < pages:
        with conn, conn.cursor() as cur:  # one transaction per range of pages
            cur.execute(select, {**(params or {}), "start": f"({start},0)", "end": f"({start + step},0)"})
            changed = [new for row in cur.fetchall() if (new := change(row)) is not None]
            if changed:
                execute_values(cur, update, changed, page_size=len(changed))
        changed_rows += len(changed)
        start += step
        if follow_growth:
            pages = max(pages, size(conn, table, count=False)[0])
        if time.monotonic() - last_log >= PROGRESS_EVERY_SECONDS:
            progress(min(start, pages), pages, changed_rows)
            last_log = time.monotonic()
    return changed_rows


def size(conn: Connection, table: str, *, count: bool = True) -> tuple[int, int]:
    """(pages, rows) of a table; rows only when `count` (a full scan, once per pass)."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int", (table,))
        pages = int(one_row(cur)[0])
        rows = 0
        if count:
            cur.execute(f"SELECT count(*) FROM {table}")
            rows = int(one_row(cur)[0])
    return pages, rows


def leaves(conn: Connection, table: str) -> list[str]:
    """The tables holding `table`'s rows: itself, or its partitions (and, for user_logins, the legacy
    table a migration to partitions is still moving); none if it does not exist."""
    names = [table] + (["user_logins_legacy"] if table == "user_logins" else [])
    found: list[str] = []
    with conn, conn.cursor() as cur:
        for name in names:
            # pg_partition_tree() has no rows for a plain table: it is its own leaf then.
            cur.execute(
                """SELECT relid::regclass::text FROM pg_partition_tree(to_regclass(%(t)s)) WHERE isleaf
                           UNION SELECT %(t)s WHERE (SELECT relkind FROM pg_class WHERE oid = to_regclass(%(t)s)) = 'r'
                           ORDER BY 1""",
                {"t": name},
            )
            found.extend(row[0] for row in cur.fetchall())
    return found
