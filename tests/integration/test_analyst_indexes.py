"""The token indexes of schema 4 (issue 18, analysts at scale), against the real PostgreSQL: the
duplicates view and the analysts' three queries can be answered from them, and give the same
answers as a plain scan of the table and as counting the stored messages by hand, after a
redelivered batch, quarantined messages, a rekey and a retention run; a schema 3 database gets
them at its next start, also when a first attempt was cut short."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg2

from analysts import OLD_DAY, TODAY, add_day, by_hand, load_logins, rekey_all, sample_logins
from database import partitions
from database.retention import Retention
from database.sqs_postgres import SCHEMA_VERSION, PostgresWriter
from helpers import query
from models import MaskedLogin

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


def _assert_index_answers_as_plain_scan(database_url: str, stored: list[MaskedLogin]) -> None:
    for name, plan in _plans(database_url).items():
        assert "Index Only Scan" in plan and "Seq Scan" not in plan, f"{name}:\n{plan}"
    fast, plain = _answers(database_url, _INDEX_ONLY), _answers(database_url, _PLAIN_SCAN)
    assert fast == plain
    assert sorted(fast["view"]) == by_hand(stored)  # sorted in Python: not the collation's order


def test_the_analysts_queries_are_answered_from_the_token_indexes_as_a_plain_scan_answers_them(database_url) -> None:
    # GIVEN logins written by the ETL's writer, one batch delivered again (straight and as a
    # redelivery), and quarantined messages (one of them a message already loaded)
    logins = load_logins(database_url)
    # THEN every answer from the indexes is the plain scan's, and the messages counted once each
    _assert_index_answers_as_plain_scan(database_url, logins)

    # WHEN every token is rewritten by a rekey (a new token per old one, as under a new key)
    rekeyed = rekey_all(database_url, logins)
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
        writer.write(sample_logins(), [])
    finally:
        writer.close()
    query(database_url, f"DROP INDEX {', '.join(partitions.TOKEN_INDEXES)}")
    query(
        database_url,
        "DROP MATERIALIZED VIEW user_login_duplicates_snapshot; DELETE FROM etl_schema_version WHERE version > 3",
    )
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
    assert query(database_url, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)]
    # AND a day created later gets them too, and the queries can use them
    add_day(database_url, TODAY + timedelta(days=30))
    assert _token_indexes_complete(database_url)
    _assert_index_answers_as_plain_scan(database_url, sample_logins())
