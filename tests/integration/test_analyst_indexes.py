"""The token indexes of schema 5 (issue 18, analysts at scale: on the closed days only), against the
real PostgreSQL: today's partition has none, the closed ones get theirs from a pass of
database/token_indexes.py (idempotent, skipped while another session holds its lock, an INVALID
leftover dropped and built again); the duplicates view and the analysts' three queries read the
closed days from those indexes and today's partition by a scan, and give the same answers as a
plain scan and as counting the stored messages by hand, after a redelivered batch, quarantined
messages, a rekey and a retention run; a schema 4 database (indexes on the parent) is migrated; the
ETL's indexer thread does not delay a SIGTERM stop and leaves no build running."""

from __future__ import annotations

import re
import signal
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg2

from analysts import OLD_DAY, TODAY, add_day, by_hand, load_logins, rekey_all, sample_logins
from database import partitions
from database.retention import Retention
from database.schema import SCHEMA_VERSION
from database.sqs_postgres import PostgresWriter
from database.token_indexes import TOKEN_INDEX_LOCK_ID, IndexPass, TokenIndexer, index_closed_days, nightly_pass
from helpers import login, output, query, send, start_etl, wait_for_rows, wait_until
from models import MaskedLogin

YESTERDAY = TODAY - timedelta(days=1)

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
# Index scans wherever there is an index. Today's partition has none, so it is still scanned, at the
# disabled-scan cost of 1e10, which would make PostgreSQL JIT-compile each query (~1 s here): jit off.
_INDEX_ONLY = "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_indexscan = on; SET jit = off"
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


def _index_pass(database_url: str) -> IndexPass:
    """One pass of the indexer, as the ETL's thread and the nightly job run it."""
    conn = psycopg2.connect(database_url)
    try:
        return index_closed_days(conn, TODAY)
    finally:
        conn.close()


def _token_indexes(database_url: str) -> dict[str, dict[str, bool | None]]:
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            return partitions.token_index_state(cur)
    finally:
        conn.close()


def _stored_days(database_url: str) -> set[str]:
    """The partitions that hold rows."""
    return {name for (name,) in query(database_url, "SELECT DISTINCT tableoid::regclass::text FROM user_logins")}


def _assert_index_answers_as_plain_scan(database_url: str, stored: list[MaskedLogin]) -> None:
    # Every closed partition holding rows is read by an index-only scan of its token index, and
    # never scanned; today's partition (no token index) is read by a scan, sorted into the merge.
    closed = {leaf for leaf in _stored_days(database_url) if partitions.is_closed(leaf, TODAY)}
    assert closed and partitions.partition_name(TODAY) in _stored_days(database_url)
    for name, plan in _plans(database_url).items():
        for leaf in closed:
            assert re.search(rf"Index Only Scan using {leaf}_(device|ip)_user_day on {leaf}\b", plan), (
                f"{name}:\n{plan}"
            )
            assert not re.search(rf"Seq Scan on {leaf}\b", plan), f"{name}:\n{plan}"
        assert f"Seq Scan on {partitions.partition_name(TODAY)}" in plan, f"{name}:\n{plan}"
    fast, plain = _answers(database_url, _INDEX_ONLY), _answers(database_url, _PLAIN_SCAN)
    assert fast == plain
    assert sorted(fast["view"]) == by_hand(stored)  # sorted in Python: not the collation's order


def test_the_analysts_queries_are_answered_from_the_token_indexes_as_a_plain_scan_answers_them(database_url) -> None:
    # GIVEN logins written by the ETL's writer, one batch delivered again (straight and as a
    # redelivery), and quarantined messages (one of them a message already loaded)
    logins = load_logins(database_url)
    # AND the closed days indexed by a pass of the indexer (today's partition is not)
    assert _index_pass(database_url).built
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


def _written(database_url: str) -> None:
    """The schema as the ETL creates it, holding sample_logins() (today, yesterday, OLD_DAY, the default)."""
    writer = PostgresWriter(database_url)
    writer.connect()
    add_day(database_url, OLD_DAY)
    try:
        writer.write(sample_logins(), [])
    finally:
        writer.close()


def _indexed(state: dict[str, dict[str, bool | None]]) -> dict[str, bool]:
    """Partition -> True if both its token indexes are there and valid, False if neither is."""
    result = {}
    for leaf, indexes in state.items():
        values = set(indexes.values())
        assert len(values) == 1, f"{leaf}: {indexes}"  # both or neither
        result[leaf] = values == {True}
    return result


def test_todays_partition_has_no_token_index_and_a_pass_indexes_the_closed_ones_once(database_url) -> None:
    # GIVEN the schema as the ETL creates it, with logins over four days and the default partition
    _written(database_url)
    closed = {partitions.partition_name(d) for d in (YESTERDAY, OLD_DAY)} | {partitions.DEFAULT_PARTITION}
    # THEN no partition has a token index yet, nor the parent
    assert not any(_indexed(_token_indexes(database_url)).values())
    assert query(
        database_url,
        "SELECT count(*) FROM pg_indexes WHERE tablename = 'user_logins' AND schemaname = current_schema()",
    ) == [(1,)]
    # WHEN the indexer makes a pass
    built = _index_pass(database_url)
    # THEN exactly the closed partitions have both indexes, valid; today's and the coming days' none
    assert sorted(built.built) == sorted(name for leaf in closed for name in partitions.token_index_names(leaf))
    assert {leaf for leaf, done in _indexed(_token_indexes(database_url)).items() if done} == closed
    # AND a second pass finds nothing to do
    assert _index_pass(database_url) == IndexPass()


def test_a_pass_skips_while_another_session_holds_the_indexer_lock_of_this_schema(database_url) -> None:
    _written(database_url)
    holder = psycopg2.connect(database_url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s, hashtext(current_schema()))", (TOKEN_INDEX_LOCK_ID,))
        assert _index_pass(database_url) == IndexPass(skipped=True)
        assert not any(_indexed(_token_indexes(database_url)).values())
    finally:
        holder.close()
    assert _index_pass(database_url).built  # released: the next pass builds


def test_an_invalid_leftover_under_our_name_is_dropped_and_built_again(database_url) -> None:
    # GIVEN a build cut short on yesterday's partition: an INVALID index under our name (here a
    # unique build that failed on duplicates, which leaves one, as a cancelled or killed build does)
    _written(database_url)
    leaf = partitions.partition_name(YESTERDAY)
    name = f"{leaf}_device_user_day"
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON {leaf} (device_type)")
            except psycopg2.errors.UniqueViolation:
                pass
            else:
                raise AssertionError("the unique build should have failed")
    finally:
        conn.close()
    assert _token_indexes(database_url)[leaf][name] is False
    # WHEN the indexer makes a pass
    done = _index_pass(database_url)
    # THEN the leftover is dropped and the index built again, valid, on the token columns
    assert done.dropped == [name] and name in done.built
    assert _token_indexes(database_url)[leaf][name] is True
    [(definition,)] = query(database_url, "SELECT pg_get_indexdef(%s::regclass)", (name,))
    assert "UNIQUE" not in definition and "(masked_device_id, user_id, create_date)" in definition


def test_a_schema_4_database_loses_the_parent_indexes_and_the_indexer_builds_the_closed_days(database_url) -> None:
    # GIVEN a schema 4 database: the token indexes on the parent, so on every partition, today's too
    _written(database_url)
    for name, columns in zip(partitions.PARENT_TOKEN_INDEXES, list(partitions.TOKEN_INDEXES.values())[:2], strict=True):
        query(database_url, f"CREATE INDEX {name} ON user_logins {columns}")
    query(database_url, "DELETE FROM etl_schema_version WHERE version > 4; INSERT INTO etl_schema_version VALUES (4)")
    today = partitions.partition_name(TODAY)
    assert query(database_url, "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass", (today,)) == [(3,)]
    query(database_url, "DROP MATERIALIZED VIEW user_login_duplicates_snapshot")  # schema 5's, not 4's
    before = query(database_url, "SELECT * FROM user_logins ORDER BY message_id")
    # WHEN the ETL starts (twice: the migration is idempotent)
    for _ in range(2):
        writer = PostgresWriter(database_url)
        writer.connect()
        writer.close()
    # THEN the parent's token indexes are gone, and with them every partition's: the unique index only
    assert query(database_url, "SELECT to_regclass(%s), to_regclass(%s)", partitions.PARENT_TOKEN_INDEXES) == [
        (None, None)
    ]
    assert query(
        database_url,
        "SELECT count(*) FROM pg_index x JOIN pg_inherits i ON i.inhrelid = x.indrelid "
        "WHERE i.inhparent = 'user_logins'::regclass AND NOT x.indisunique",
    ) == [(0,)]
    assert query(database_url, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)]
    assert query(database_url, "SELECT * FROM user_logins ORDER BY message_id") == before
    # AND the analysts' snapshot is there (schema 5's other part), not yet refreshed
    assert query(
        database_url,
        "SELECT relispopulated FROM pg_class WHERE oid = to_regclass('user_login_duplicates_snapshot')",
    ) == [(False,)]
    # AND a pass of the indexer (the ETL's thread) gives the closed days theirs back
    _index_pass(database_url)
    indexed = _indexed(_token_indexes(database_url))
    assert {leaf for leaf, done in indexed.items() if done} == {
        leaf for leaf in indexed if partitions.is_closed(leaf, TODAY)
    }
    assert not indexed[today]
    _assert_index_answers_as_plain_scan(database_url, sample_logins())


def _has_both(database_url: str, day: date) -> bool:
    return all(_token_indexes(database_url)[partitions.partition_name(day)].values())


def test_the_etls_indexer_thread_indexes_at_start_and_again_once_the_utc_day_has_changed(database_url) -> None:
    _written(database_url)
    today = [TODAY]
    indexer = TokenIndexer(database_url, check_seconds=0.05, today=lambda: today[0])
    indexer.start()
    try:
        # at start: the closed days, not today's
        wait_until(lambda: _has_both(database_url, YESTERDAY), "yesterday's partition indexed")
        time.sleep(0.3)  # a few more checks: the same day, nothing more
        assert not any(_token_indexes(database_url)[partitions.partition_name(TODAY)].values())
        # WHEN the UTC day changes: today's partition is closed, and indexed
        today[0] = TODAY + timedelta(days=1)
        wait_until(lambda: _has_both(database_url, TODAY), "the day just closed indexed")
    finally:
        indexer.stop()


def _waiting_builds(database_url: str, leaf: str) -> int:
    """Sessions waiting for a lock on `leaf` (the indexer's build, behind the test's lock)."""
    return int(
        query(database_url, "SELECT count(*) FROM pg_locks WHERE relation = %s::regclass AND NOT granted", (leaf,))[0][
            0
        ]
    )


def test_the_etls_indexer_thread_does_not_delay_a_sigterm_stop_and_its_build_is_cancelled(
    etl_env, sqs_client, tmp_path
) -> None:
    # GIVEN yesterday's partition locked against index builds (not against writes): the ETL's
    # indexer thread waits there in CREATE INDEX CONCURRENTLY
    db = etl_env["DATABASE_URL"]
    PostgresWriter(db).connect()
    leaf = partitions.partition_name(YESTERDAY)
    holder = psycopg2.connect(db)
    try:
        with holder.cursor() as cur:
            cur.execute(f"LOCK TABLE {leaf} IN SHARE UPDATE EXCLUSIVE MODE")
        process = start_etl(tmp_path, "--follow", "--wait-seconds", "1")
        wait_until(lambda: _waiting_builds(db, leaf) == 1, "the indexer's build waiting on yesterday's partition")
        # AND the writer meanwhile writes
        send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(20)])
        wait_for_rows(db, count=20)
        # WHEN the ETL is stopped
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=15) == 0, output(tmp_path)
        # THEN it exits as fast as it does without the indexer, and the build was cancelled, not left waiting
        assert time.monotonic() - started < 8
        wait_until(lambda: _waiting_builds(db, leaf) == 0, "the cancelled build to go", timeout=5)
    finally:
        holder.close()


def test_a_build_kept_waiting_by_an_open_transaction_gives_up_in_bounded_steps_and_names_the_session(
    database_url,
) -> None:
    # GIVEN the closed days without their indexes and an analyst's session left open in a
    # transaction with a snapshot (every CREATE INDEX CONCURRENTLY waits for it)
    _written(database_url)
    analyst = psycopg2.connect(database_url, application_name="analyst-psql")
    try:
        analyst.set_session(isolation_level="REPEATABLE READ")
        with analyst.cursor() as cur:
            cur.execute("SELECT count(*) FROM user_logins")
        # WHEN the nightly pass runs with lock waits of 0.5 s, at most 0.8 s per index
        started = time.monotonic()
        line = nightly_pass(database_url, lock_step_seconds=0.5, lock_wait_seconds=0.8)
        took = time.monotonic() - started
        # THEN it returns, every missing index left for the next pass with the session named;
        # no index is valid (the cancelled builds' INVALID leftovers, which the session's lock on
        # the partitions keeps from being dropped now, go at the next pass)
        missing = 3 * 3  # yesterday's, OLD_DAY's and the default partition's three (ip, device, network)
        assert took < missing * 2 + 5, took
        assert line.startswith("token indexes: none built; not built, waited too long for older transactions: "), line
        assert line.count("analyst-psql") == missing, line
        pid = analyst.get_backend_pid()
        assert f"pid {pid} (analyst-psql, user " in line and "idle in transaction since " in line
        state = _token_indexes(database_url)
        assert not any(valid for indexes in state.values() for valid in indexes.values()), state
    finally:
        analyst.close()
    # AND once the session is gone the next pass drops the leftovers and builds them all
    again = _index_pass(database_url)
    assert len(again.built) == missing and not again.waited
    assert all(
        valid for indexes in _token_indexes(database_url).values() for valid in indexes.values() if valid is not None
    )


def _documented_query(doc: str) -> str:
    """The ```sql block of docs/<doc> that counts our connections."""
    text = (Path(__file__).resolve().parents[2] / "docs" / doc).read_text()
    found = re.search(r"```sql\n\s*(SELECT application_name.*?)\n\s*```", text, re.DOTALL)
    assert found is not None, doc
    return found.group(1)


def test_the_documented_connection_query_finds_the_writer_and_the_token_indexer(database_url) -> None:
    # GIVEN the writer's connection and the ETL's indexer thread, its build held up on yesterday's
    # partition (so its connection is there to be seen)
    _written(database_url)
    writer = PostgresWriter(database_url)
    writer.connect()
    leaf = partitions.partition_name(YESTERDAY)
    holder = psycopg2.connect(database_url)
    indexer = TokenIndexer(database_url, today=lambda: TODAY)
    try:
        with holder.cursor() as cur:
            cur.execute(f"LOCK TABLE {leaf} IN SHARE UPDATE EXCLUSIVE MODE")
        indexer.start()
        wait_until(lambda: _waiting_builds(database_url, leaf) == 1, "the indexer's build waiting")
        [(indexer_pid,)] = query(
            database_url, "SELECT pid FROM pg_locks WHERE relation = %s::regclass AND NOT granted", (leaf,)
        )
        session = writer._conn  # noqa: SLF001 - the writer's own session
        assert session is not None
        writer_pid = session.get_backend_pid()
        # WHEN the query of docs/kubernetes.md (and of docs/lambda.md) runs, restricted to these two
        for doc in ("kubernetes.md", "lambda.md"):
            sql = _documented_query(doc)
            where = sql[sql.index("WHERE") + len("WHERE") : sql.index("GROUP BY")].replace("%", "%%")
            found = query(
                database_url,
                f"SELECT pid, application_name FROM pg_stat_activity WHERE ({where}) AND pid IN (%s, %s)",
                (writer_pid, indexer_pid),
            )
            # THEN it finds both, by their names (application_name = 'login-etl' found only the writer)
            assert sorted(found) == sorted([(writer_pid, "login-etl"), (indexer_pid, "login-etl-token-indexer")]), doc
            assert query(database_url, sql.replace("%", "%%")), doc  # and it runs as written
    finally:
        indexer.stop()
        holder.close()
        writer.close()
