"""Scale benchmark of user_logins (issue 18): the write rate as the table grows, today's layout
against the daily partitions, in the same run; the analysts' queries and the snapshot; disk per
million rows.

    PYTHONPATH=scripts .venv/bin/python -m bench.partitions [--sizes 0,10,50] [--rows-per-day-m 2]
        [--batches 30] [--layouts plain,partitioned] [--query-layouts partitioned] [--queries-from-m 10]

For each layout (`plain`: schema 2, one table, UNIQUE (message_id), the layout before the daily
partitions; `partitioned`: schema 5, exactly as the ETL creates it: daily partitions, today's with
the unique index only, every closed day with the two token indexes, built by the ETL's own indexer,
`database.token_indexes.index_closed_days`) in its own throw-away database `bench_part_<uuid>`, the
table is preloaded with SQL up to each size (millions of rows, random UUID message ids, dated over
past days, --rows-per-day-m million a day; the layouts side by side), then --batches COPYs of
10,000 rows dated today are timed, each in its own transaction, with the ETL's own COPY text
(`copy_text`), as the sink does; the layouts' batches alternate. At each size from
--queries-from-m up, on the --query-layouts: the README's three queries, the whole duplicates view,
one-day and one-device queries, then (schema 5) the snapshot's first and concurrent refreshes and
its three top-20 queries. Prints everything; asserts nothing. Needs PostgreSQL on DATABASE_URL
(default: the embedded stack's).
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import statistics
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from typing import Any

import psycopg2

from bench.partitions_sql import PLAIN_DDL, PRELOAD, connect, one, space_used, timed_queries, timed_snapshot
from database import partitions
from database.copy_format import copy_text
from database.schema import CREATE_DUPLICATES_VIEW, LOGIN_COLUMNS
from database.sqs_postgres import PostgresWriter
from database.token_indexes import index_closed_days
from models import MaskedLogin

LAYOUTS = ("plain", "partitioned")
BATCH_ROWS = 10_000
PRELOAD_CHUNK = 1_000_000


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    layouts = [layout for layout in LAYOUTS if layout in args.layouts.split(",")]
    sizes = [int(float(s) * 1_000_000) for s in args.sizes.split(",")]
    admin = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    started = time.monotonic()
    _print_header(admin, args, sizes)
    results: dict[str, list[tuple[int, float, list[float]]]] = {layout: [] for layout in layouts}
    space: dict[str, tuple[int, int, int]] = {}
    timings: list[tuple[int, str, str, float]] = []
    databases = {layout: _database(admin) for layout in layouts}
    try:
        loaded = dict.fromkeys(databases, 0)
        for layout, (dsn, _drop) in databases.items():
            _create(dsn, layout)
        for size in sizes:
            _measure_size(admin, args, databases, loaded, size, results)
            if size >= args.queries_from_m * 1_000_000 and not args.skip_queries:
                timings += _time_queries(args, databases, size)
        for layout, (dsn, _drop) in databases.items():
            space[layout] = space_used(dsn)
    finally:
        for _dsn, drop in databases.values():
            drop()
    _print_summary(layouts, sizes, results, space, timings)
    print(f"\nfinished after {(time.monotonic() - started) / 60:.1f} min; load average {_load()}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,10,50", help="table sizes in millions of rows (0,10,50)")
    parser.add_argument("--rows-per-day-m", type=float, default=2.0, help="preloaded millions of rows per day (2)")
    parser.add_argument("--batches", type=int, default=30, help="timed 10,000-row COPYs per size (30)")
    parser.add_argument(
        "--queries-from-m",
        type=float,
        default=10.0,
        help="time the analysts' queries at sizes from this many million rows (10)",
    )
    parser.add_argument("--skip-queries", action="store_true")
    parser.add_argument(
        "--concurrent-refresh-up-to-m",
        type=float,
        default=10.0,
        help="time the snapshot's concurrent refresh at sizes up to this many million rows (10)",
    )
    parser.add_argument(
        "--query-layouts",
        default="partitioned",
        help="time the queries on these layouts only (partitioned); `plain` has no token index: minutes at 50M",
    )
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"some of {','.join(LAYOUTS)} (all)")
    return parser


def _print_header(admin: str, args: argparse.Namespace, sizes: list[int]) -> None:
    print(f"user_logins scale benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: nproc {len(os.sched_getaffinity(0))}, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; load average {_load()}"
    )
    with connect(admin) as conn, conn.cursor() as cur:
        cur.execute("SELECT version(), current_setting('shared_buffers'), current_setting('work_mem')")
        version, shared_buffers, work_mem = one(cur)
    print(f"PostgreSQL: {version.split(',')[0]}; shared_buffers {shared_buffers}, work_mem {work_mem}")
    print(
        f"sizes (rows preloaded): {', '.join(f'{s:,}' for s in sizes)}; {args.batches} COPYs of "
        f"{BATCH_ROWS:,} rows dated today per size; preload {args.rows_per_day_m}M rows per past day\n"
    )


def _measure_size(
    admin: str,
    args: argparse.Namespace,
    databases: dict[str, Any],
    loaded: dict[str, int],
    size: int,
    results: dict[str, list[tuple[int, float, list[float]]]],
) -> None:
    """Preload every layout up to `size`, then time the COPYs; append to `results`."""
    # The layouts preload side by side (one connection each, nothing timed meanwhile but
    # the preloads themselves), then wait for the checkpoint their writes started.
    preload = {}
    with ThreadPoolExecutor(max_workers=len(databases)) as pool:
        futures = {
            layout: pool.submit(_timed_preload, dsn, layout, loaded[layout], size, int(args.rows_per_day_m * 1_000_000))
            for layout, (dsn, _drop) in databases.items()
        }
        for layout, future in futures.items():
            loaded[layout], preload[layout] = future.result()
    with connect(admin) as conn, conn.cursor() as cur:
        cur.execute("CHECKPOINT")
    # The two layouts' batches alternate, so that whatever else the machine does hits both alike.
    rates: dict[str, list[float]] = {layout: [] for layout in databases}
    for b in range(args.batches):
        for layout, (dsn, _drop) in databases.items():
            rates[layout].append(_copy_rate(dsn, size, b))
    for layout in databases:
        r = rates[layout]
        results[layout].append((size, preload[layout], r))
        print(
            f"{layout:<12} at {size / 1e6:>5.1f}M rows: COPY median {statistics.median(r):>9,.0f} rows/s "
            f"(min {min(r):,.0f}, max {max(r):,.0f}); preload took {preload[layout]:.0f} s",
            flush=True,
        )


def _time_queries(args: argparse.Namespace, databases: dict[str, Any], size: int) -> list[tuple[int, str, str, float]]:
    query_layouts = set(args.query_layouts.split(","))
    timings = []
    for layout, (dsn, _drop) in databases.items():
        if layout not in query_layouts:
            continue
        refreshes = 2 if size <= args.concurrent_refresh_up_to_m * 1_000_000 else 1
        timed = timed_queries(dsn) + (timed_snapshot(dsn, refreshes) if layout == "partitioned" else [])
        for name, seconds in timed:
            timings.append((size, layout, name, seconds))
            print(f"    {layout:<12} {name:<34} {seconds:>7.2f} s", flush=True)
    return timings


def _print_summary(
    layouts: list[str],
    sizes: list[int],
    results: dict[str, list[tuple[int, float, list[float]]]],
    space: dict[str, tuple[int, int, int]],
    timings: list[tuple[int, str, str, float]],
) -> None:
    print("\nwrite rate (median rows/s of the timed COPYs), relative to the empty table")
    print(f"{'rows in table':>14}" + "".join(f"  {layout:>11} {'ratio':>6}" for layout in layouts))
    for i, size in enumerate(sizes):
        cells = []
        for layout in layouts:
            rate = statistics.median(results[layout][i][2])
            base = statistics.median(results[layout][0][2])
            cells.append(f"{rate:>11,.0f} {rate / base:>6.2f}")
        print(f"{size:>14,}  " + "  ".join(cells))
    print("\ndisk per million rows (heap + indexes, after the run)")
    for layout, (heap, indexes, rows) in space.items():
        per = 1_000_000 / max(rows, 1)
        print(
            f"  {layout:<12} {heap * per / 2**20:>7.1f} MB heap + {indexes * per / 2**20:>6.1f} MB indexes "
            f"= {(heap + indexes) * per / 2**20:>7.1f} MB  ({rows:,} rows)"
        )
    if timings:
        print("\nanalysts' queries (one run each, right after the COPYs)")
        for size, layout, name, seconds in timings:
            print(f"  {size / 1e6:>5.1f}M rows  {layout:<12} {name:<34} {seconds:>7.2f} s")


def _load() -> str:
    return " ".join(f"{n:.2f}" for n in os.getloadavg())


def _database(admin: str):
    name = f"bench_part_{uuid.uuid4().hex[:10]}"
    conn = connect(admin)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    dsn = psycopg2.extensions.make_dsn(admin, dbname=name)

    def drop() -> None:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE {name} WITH (FORCE)")
        conn.close()

    return dsn, drop


def _create(dsn: str, layout: str) -> None:
    if layout == "partitioned":
        writer = PostgresWriter(dsn)  # the schema exactly as the ETL creates it
        writer.connect()
        writer.close()
        return
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(PLAIN_DDL)
        cur.execute(CREATE_DUPLICATES_VIEW)


def _timed_preload(dsn: str, layout: str, loaded: int, size: int, per_day: int) -> tuple[int, float]:
    t0 = time.monotonic()
    return _preload(dsn, layout, loaded, size, per_day), time.monotonic() - t0


def _preload(dsn: str, layout: str, loaded: int, size: int, per_day: int) -> int:
    """Grow the table from `loaded` to `size` rows, dated over the days before yesterday.

    Fast, and the same end state as rows written one by one: the unique index is built once per
    step, by sorting (plain: dropped and added again; partitioned: each past day is filled as a
    table of its own, then attached, which builds its unique index; then the ETL's indexer builds
    the closed days' token indexes, CONCURRENTLY, as it does in production).
    """
    last_day = datetime.now(timezone.utc).date() - timedelta(days=2)
    if size <= loaded:
        return loaded
    conn = connect(dsn)
    conn.autocommit = True  # one statement per day, each its own transaction
    try:
        with conn.cursor() as cur:
            cur.execute("SET synchronous_commit = off; SET maintenance_work_mem = '512MB'")
            if layout == "plain":
                cur.execute("ALTER TABLE user_logins DROP CONSTRAINT user_logins_message_id_key")
            for d in range(loaded // per_day, (size - 1) // per_day + 1):
                first, last = max(loaded, d * per_day), min(size, (d + 1) * per_day) - 1
                day = last_day - timedelta(days=d)
                target = "user_logins"
                if layout != "plain":
                    target = partitions.partition_name(day)
                    cur.execute(f"SELECT to_regclass('{target}') IS NOT NULL")
                    (attached,) = one(cur)
                    if attached:
                        cur.execute(f"ALTER TABLE user_logins DETACH PARTITION {target}")
                        cur.execute(f"DROP INDEX IF EXISTS {target}_message_id_create_date_key")
                        cur.execute(f"DROP INDEX IF EXISTS {', '.join(partitions.token_index_names(target))}")
                    else:
                        cur.execute(f"CREATE TABLE {target} (LIKE user_logins)")
                cur.execute(
                    PRELOAD.replace("INSERT INTO user_logins", f"INSERT INTO {target}"),
                    {
                        "users": max(size // 8, 1),
                        "pool": max(size // 4, 1),
                        "last_day": last_day,
                        "per_day": per_day,
                        "first": first,
                        "last": last,
                    },
                )
                if layout != "plain":
                    # A closed day: its token indexes, built by sorting (the indexer would build the
                    # same ones CONCURRENTLY, two scans each: the end state is the same, in half the time).
                    for name, columns in partitions.token_index_names(target).items():
                        cur.execute(f"CREATE INDEX IF NOT EXISTS {name} ON {target} {columns}")
                    cur.execute(
                        f"ALTER TABLE user_logins ATTACH PARTITION {target} FOR VALUES FROM (%s) TO (%s)",
                        (day, day + timedelta(days=1)),
                    )
            if layout == "plain":
                cur.execute("ALTER TABLE user_logins ADD CONSTRAINT user_logins_message_id_key UNIQUE (message_id)")
            cur.execute("VACUUM ANALYZE user_logins")
        if layout == "partitioned":  # whatever closed partition still lacks them, by the ETL's own indexer
            index_closed_days(conn)
    finally:
        conn.close()
    return size


def _copy_rate(dsn: str, size: int, batch: int) -> float:
    """Rows/s of one 10,000-row COPY dated today, in its own transaction (a new connection each time,
    as cheap as the sink's reused one: the connection is made before the clock starts). Random
    message ids and tokens, as real ones are: each row lands on a random page of every index."""
    today: date = datetime.now(timezone.utc).date()
    rows = [
        MaskedLogin(
            str(uuid.uuid4()),
            str(uuid.uuid4()),
            "ios",
            _token(IP_TOKEN_BYTES),
            _token(DEVICE_TOKEN_BYTES),
            None,
            "2.3.0",
            today,
        )
        for i in range(BATCH_ROWS)
    ]
    text = copy_text(rows)
    conn = connect(dsn)
    try:
        t0 = time.perf_counter()
        with conn, conn.cursor() as cur:
            cur.copy_expert(f"COPY user_logins ({', '.join(_COPY_COLUMNS)}) FROM STDIN", _Reader(text))  # type: ignore[arg-type]
        return BATCH_ROWS / (time.perf_counter() - t0)
    finally:
        conn.close()


_COPY_COLUMNS = LOGIN_COLUMNS  # the writer's own COPY order
# Bytes a token encodes (Tink's 5-byte prefix, the 16-byte SIV, the plaintext: 16 bytes for an IP,
# 32 for a padded device id): 52 and 72 base64 characters.
IP_TOKEN_BYTES = 5 + 16 + 16
DEVICE_TOKEN_BYTES = 5 + 16 + 32


def _token(size: int) -> str:
    return base64.b64encode(os.urandom(size)).decode("ascii")


class _Reader:
    """The COPY text handed over in one read, as the sink does."""

    def __init__(self, text: str) -> None:
        self._text: str | None = text

    def read(self, _size: int = -1) -> str:
        text, self._text = self._text, None
        return text or ""


if __name__ == "__main__":
    sys.exit(main())
