"""The SQL of bench.partitions: the analysts' queries and the snapshot it times, the plain layout's
table, the preload, the disk space; and its connections."""

from __future__ import annotations

import time
from typing import Any

import psycopg2

from database.snapshot import SnapshotRefresher

QUERIES = {
    "devices seen most often": """SELECT masked_value, logins, users, first_seen, last_seen
        FROM user_login_duplicates WHERE field = 'device_id' ORDER BY logins DESC LIMIT 20""",
    "IPs seen most often": """SELECT masked_value, logins, users, first_seen, last_seen
        FROM user_login_duplicates WHERE field = 'ip' ORDER BY logins DESC LIMIT 20""",
    "users sharing a device": """SELECT masked_device_id, count(DISTINCT user_id) AS users,
        array_agg(DISTINCT user_id) AS user_ids
        FROM user_logins GROUP BY masked_device_id HAVING count(DISTINCT user_id) > 1
        ORDER BY users DESC LIMIT 20""",
    "the whole duplicates view": "SELECT field, count(*), sum(logins) FROM user_login_duplicates GROUP BY 1",
    "one day's logins by device type": """SELECT device_type, count(*) FROM user_logins
        WHERE create_date = current_date - 3 GROUP BY 1""",
    "one device's logins": """SELECT user_id, create_date FROM user_logins
        WHERE masked_device_id = (SELECT masked_device_id FROM user_logins WHERE create_date = current_date - 3
                                   LIMIT 1)""",
    "devices seen most often, 3 days": """SELECT masked_device_id, count(*) AS logins,
        count(DISTINCT user_id) AS users FROM user_logins
        WHERE create_date >= current_date - 3 AND masked_device_id IS NOT NULL
        GROUP BY masked_device_id HAVING count(*) > 1 ORDER BY logins DESC LIMIT 20""",
}
PLAIN_DDL = """
CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
    masked_device_id varchar(256), locale varchar(32), app_version varchar(32), create_date date,
    message_id varchar(128), masked_network varchar(256),
    CONSTRAINT user_logins_message_id_key UNIQUE (message_id))"""
# Rows shaped like the ETL's: a UUID message id, tokens of the length today's tokens have (base64
# of Tink's prefix, SIV and plaintext: 52 characters for an IP, 72 for a device id), ~4 logins per
# device and per IP, a UUID user id.
PRELOAD = """
INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, locale, app_version,
                         create_date)
SELECT gen_random_uuid()::text, md5(mod(n, %(users)s)::text)::uuid::text,
       CASE WHEN mod(n, 2) = 0 THEN 'android' ELSE 'ios' END,
       'AQAAAAE' || md5('ip' || mod(n * 7919, %(pool)s)) || left(md5('IP' || mod(n * 7919, %(pool)s)), 13),
       'AQAAAAE' || md5('dev' || mod(n * 104729, %(pool)s)) || md5('DEV' || mod(n * 104729, %(pool)s)) || '=',
       CASE WHEN mod(n, 3) = 0 THEN NULL ELSE 'RU' END, '2.3.0',
       %(last_day)s::date - (n / %(per_day)s)::int
  FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS n"""
SNAPSHOT_QUERIES = {
    "snapshot: devices seen most often": """SELECT masked_value, logins, users, first_seen, last_seen
        FROM user_login_duplicates_snapshot WHERE field = 'device_id' ORDER BY logins DESC LIMIT 20""",
    "snapshot: IPs seen most often": """SELECT masked_value, logins, users, first_seen, last_seen
        FROM user_login_duplicates_snapshot WHERE field = 'ip' ORDER BY logins DESC LIMIT 20""",
    "snapshot: devices with most users": """SELECT masked_value, users, logins
        FROM user_login_duplicates_snapshot WHERE field = 'device_id' ORDER BY users DESC LIMIT 20""",
}


def one(cur: psycopg2.extensions.cursor) -> tuple[Any, ...]:
    row = cur.fetchone()
    assert row is not None, "the query returns one row"
    return row


def connect(dsn: str) -> psycopg2.extensions.connection:
    return psycopg2.connect(dsn, application_name="bench-partitions")


def timed_queries(dsn: str, queries: dict[str, str] = QUERIES) -> list[tuple[str, float]]:
    timed = []
    conn = connect(dsn)
    try:
        for name, sql in queries.items():
            t0 = time.monotonic()
            with conn, conn.cursor() as cur:
                cur.execute("SET LOCAL statement_timeout = '600s'")
                cur.execute(sql)
                cur.fetchall()
            timed.append((name, time.monotonic() - t0))
    finally:
        conn.close()
    return timed


def timed_snapshot(dsn: str, refreshes: int) -> list[tuple[str, float]]:
    """The nightly job's refresh, as `python main.py snapshot` runs it: plainly when the snapshot is
    not populated yet, then (`refreshes` 2) concurrently; then its top-20 queries."""
    refresher = SnapshotRefresher(dsn)
    timed = []
    for _ in range(refreshes):
        result = refresher.run()
        timed.append(
            (
                f"snapshot refresh ({'concurrent' if result.concurrently else 'first'}, {result.rows:,} rows)",
                result.seconds,
            )
        )
    return timed + timed_queries(dsn, SNAPSHOT_QUERIES)


def space_used(dsn: str) -> tuple[int, int, int]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("""SELECT coalesce(sum(pg_table_size(relid)), 0), coalesce(sum(pg_indexes_size(relid)), 0)
                         FROM (SELECT relid FROM pg_partition_tree('user_logins') WHERE isleaf
                               UNION SELECT 'user_logins'::regclass WHERE NOT EXISTS
                                     (SELECT 1 FROM pg_partition_tree('user_logins'))) t""")
        heap, indexes = one(cur)
        cur.execute("SELECT count(*) FROM user_logins")
        (rows,) = one(cur)
    return int(heap), int(indexes), int(rows)
