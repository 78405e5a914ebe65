"""The token indexes of schema 4 (issue 18, analysts at scale), against the real PostgreSQL: the
duplicates view and the analysts' three queries can be answered from them, and give the same
answers as a plain scan of the table and as counting the stored messages by hand, after a
redelivered batch, quarantined messages, a rekey and a retention run; a schema 3 database gets
them at its next start, also when a first attempt was cut short."""

from __future__ import annotations

from collections import defaultdict
from datetime import date, datetime, timedelta, timezone
from typing import Any

import psycopg2

from database import partitions
from database.rekey import Rekeyer
from database.retention import Retention
from database.sqs_postgres import SCHEMA_VERSION, PostgresWriter
from helpers import query
from models import MaskedLogin, Rejection, WriteResult

TODAY = datetime.now(timezone.utc).date()
OLD_DAY = TODAY - timedelta(days=10)  # dropped by retention --keep-days 3
FAR_DAY = date(2041, 5, 6)  # the default partition

# The README's queries and the whole view, in an order without ties (fewer than 20 rows qualify,
# so LIMIT cuts nothing and the two plans must return the same rows).
QUERIES = {
    "devices": """SELECT masked_value, logins, users, first_seen, last_seen FROM user_login_duplicates
                   WHERE field = 'device_id' ORDER BY logins DESC, masked_value LIMIT 20""",
    "ips": """SELECT masked_value, logins, users, first_seen, last_seen FROM user_login_duplicates
               WHERE field = 'ip' ORDER BY logins DESC, masked_value LIMIT 20""",
    "shared devices": """SELECT masked_device_id, count(DISTINCT user_id) AS users, array_agg(DISTINCT user_id)
                           FROM user_logins GROUP BY masked_device_id HAVING count(DISTINCT user_id) > 1
                          ORDER BY users DESC, masked_device_id LIMIT 20""",
    "view": "SELECT * FROM user_login_duplicates ORDER BY field, masked_value",
}
_INDEX_ONLY = "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_indexscan = on"
_PLAIN_SCAN = (
    "SET enable_seqscan = on; SET enable_indexscan = off; SET enable_indexonlyscan = off; SET enable_bitmapscan = off"
)


def _logins() -> list[MaskedLogin]:
    """Logins over four days and the default partition: devices and IPs shared by users."""
    return [
        MaskedLogin(
            f"m-{n}",
            f"user-{n % 7}",
            "ios",
            f"v1.ip{n % 5}",
            f"v1.dev{n % 9}",
            None,
            "2.3.0",
            (TODAY, TODAY - timedelta(days=1), OLD_DAY, FAR_DAY)[n % 4],
        )
        for n in range(60)
    ]


# Rows of the original exercise's table, moved in by the migration: no message id, NULL tokens.
LEGACY = [
    MaskedLogin(
        None,  # type: ignore[arg-type]
        f"user-{n}",
        "ios",
        None if n % 2 else "v1.ip1",  # type: ignore[arg-type]
        None if n < 2 else "v1.dev1",  # type: ignore[arg-type]
        None,
        "1",
        TODAY,
    )
    for n in range(4)
]


def _insert_legacy(database_url: str) -> None:
    for r in LEGACY:
        query(
            database_url,
            "INSERT INTO user_logins (user_id, masked_ip, masked_device_id, create_date) VALUES (%s, %s, %s, %s)",
            (r.user_id, r.masked_ip, r.masked_device_id, r.create_date),
        )


def _add_day(database_url: str, day: date) -> None:
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        partitions.ensure_days(cur, [day])
    conn.close()


def _answers(database_url: str, settings: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(settings)
            answers = {}
            for name, sql in QUERIES.items():
                cur.execute(sql)
                answers[name] = cur.fetchall()
            return answers
    finally:
        conn.close()


def _plans(database_url: str) -> dict[str, str]:
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(_INDEX_ONLY)
            plans = {}
            for name, sql in QUERIES.items():
                cur.execute(f"EXPLAIN (COSTS OFF) {sql}")
                plans[name] = "\n".join(row[0] for row in cur.fetchall())
            return plans
    finally:
        conn.close()


def _by_hand(rows: list[MaskedLogin]) -> list[tuple[Any, ...]]:
    """The view's rows counted in Python from the logins stored (field, token, logins, users, first, last)."""
    seen: dict[tuple[str, str], list[MaskedLogin]] = defaultdict(list)
    for row in rows:
        for field, token in (("device_id", row.masked_device_id), ("ip", row.masked_ip)):
            if token is not None:
                seen[field, token].append(row)
    return sorted(
        (
            field,
            token,
            len(group),
            len({r.user_id for r in group}),
            min(r.create_date for r in group),
            max(r.create_date for r in group),
        )
        for (field, token), group in seen.items()
        if len(group) > 1
    )


def _assert_index_answers_as_plain_scan(database_url: str, stored: list[MaskedLogin]) -> None:
    for name, plan in _plans(database_url).items():
        assert "Index Only Scan" in plan and "Seq Scan" not in plan, f"{name}:\n{plan}"
    fast, plain = _answers(database_url, _INDEX_ONLY), _answers(database_url, _PLAIN_SCAN)
    assert fast == plain
    assert sorted(fast["view"]) == _by_hand(stored)  # sorted in Python: not the collation's order


def test_the_analysts_queries_are_answered_from_the_token_indexes_as_a_plain_scan_answers_them(database_url) -> None:
    # GIVEN logins written by the ETL's writer, one batch delivered again (straight and as a
    # redelivery), and quarantined messages (one of them a message already loaded)
    logins = _logins()
    writer = PostgresWriter(database_url)
    writer.connect()
    _add_day(database_url, OLD_DAY)
    try:
        assert writer.write(logins[:40], []) == WriteResult(40, 0, 0)
        assert writer.write(logins, []) == WriteResult(20, 0, 40)
        assert writer.write(logins[30:], [], redelivered=True) == WriteResult(0, 0, 30)
        quarantined = [Rejection(f"r-{n}", "not JSON", "v1.body", None, 1) for n in range(3)]
        assert writer.write([], [*quarantined, Rejection("m-1", "late", "v1.body", None, 2)]).rejected == 3
    finally:
        writer.close()
    _insert_legacy(database_url)
    logins += LEGACY
    # THEN every answer from the indexes is the plain scan's, and the messages counted once each
    _assert_index_answers_as_plain_scan(database_url, logins)

    # WHEN every token is rewritten by a rekey (a new token per old one, as under a new key)
    def retoken(token: str) -> str:
        return "k2." + token[::-1]

    Rekeyer(database_url, retoken, current_prefixes=("k2.",)).run()
    rekeyed = [
        MaskedLogin(
            r.message_id,
            r.user_id,
            r.device_type,
            r.masked_ip and retoken(r.masked_ip),
            r.masked_device_id and retoken(r.masked_device_id),
            r.locale,
            r.app_version,
            r.create_date,
        )
        for r in logins
    ]
    # THEN the answers follow the new tokens
    _assert_index_answers_as_plain_scan(database_url, rekeyed)
    assert not any(token.startswith("v1.") for (_f, token, *_rest) in _answers(database_url, _INDEX_ONLY)["view"])

    # WHEN retention keeps 3 days (OLD_DAY's partition dropped, FAR_DAY kept: it is not older)
    assert Retention(database_url, keep_days=3, requested_by="test", allow_redelivered_days=True).run(
        dry_run=False
    ).partitions == [(partitions.partition_name(OLD_DAY), 15)]
    # THEN the dropped day no longer counts, in either plan
    _assert_index_answers_as_plain_scan(database_url, [r for r in rekeyed if r.create_date != OLD_DAY])


def _token_indexes_complete(database_url: str) -> bool:
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            missing = partitions.missing_token_indexes(cur)
            cur.execute(
                "SELECT count(*) FILTER (WHERE x.indisvalid) FROM unnest(%s::text[]) AS i(name) "
                "JOIN pg_index x ON x.indexrelid = to_regclass(i.name)",
                (list(partitions.TOKEN_INDEXES),),
            )
            valid = cur.fetchone()[0]  # type: ignore[index]
        return missing == [] and valid == len(partitions.TOKEN_INDEXES)
    finally:
        conn.close()


def test_a_schema_3_database_gets_the_token_indexes_at_start_also_after_a_cut_short_attempt(database_url) -> None:
    # GIVEN a schema 3 database (daily partitions, no token indexes) holding logins
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        writer.write(_logins(), [])
    finally:
        writer.close()
    query(database_url, f"DROP INDEX {', '.join(partitions.TOKEN_INDEXES)}")
    query(database_url, "DELETE FROM etl_schema_version WHERE version > 3")
    before = query(database_url, "SELECT * FROM user_logins ORDER BY message_id")
    assert not _token_indexes_complete(database_url)
    # AND a first migration that stopped after one partition's index (killed: one per transaction)
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        partitions.start_token_indexes(cur)
        index, leaf = partitions.missing_token_indexes(cur)[0]
        partitions.build_token_index(cur, index, leaf)
    conn.close()
    # AND an index an administrator built beforehand by hand (CONCURRENTLY), under our name, not attached
    today = partitions.partition_name(TODAY)
    conn = psycopg2.connect(database_url)
    conn.autocommit = True  # CONCURRENTLY runs outside a transaction
    with conn.cursor() as cur:
        cur.execute(f"CREATE INDEX CONCURRENTLY {today}_ip_user_day ON {today} (masked_ip, user_id, create_date)")
    conn.close()

    # WHEN the ETL starts
    writer = PostgresWriter(database_url)
    writer.connect()
    writer.close()
    # THEN every partition has both indexes, attached and valid, the rows are unchanged, schema 4 is recorded
    assert _token_indexes_complete(database_url)
    assert query(database_url, "SELECT * FROM user_logins ORDER BY message_id") == before
    # (the one built by hand attached, not built twice: the unique index and two token indexes)
    assert query(database_url, "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass", (today,)) == [(3,)]
    assert query(database_url, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)] == [(4,)]
    # AND a day created later gets them too, and the queries can use them
    _add_day(database_url, TODAY + timedelta(days=30))
    assert _token_indexes_complete(database_url)
    _assert_index_answers_as_plain_scan(database_url, _logins())
