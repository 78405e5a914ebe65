"""The analysts' all-time snapshot of schema 5 (issue 18), against the real PostgreSQL: after each
`python main.py snapshot` it holds exactly the live view's rows (after a redelivered batch,
quarantined messages, a rekey and a retention run); a concurrent refresh leaves the previous
snapshot readable, and rewrites no row when nothing changed (its time is in a one-row table); a
snapshot of unreleased schema 5 (refreshed_at in every row) is made again at start; one refresh at
a time; refused on a schema not yet migrated; read by the analyst role only; its top-20 queries
read its indexes; a schema 4 database gets it at start. The command first gives the closed days
their missing token indexes (database/token_indexes.py), or says why it skipped (the ETL's indexer
at work, a schema not current)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from analysts import OLD_DAY, TODAY, by_hand, load_logins, rekey_all
from cli.exit_codes import EXIT_BUSY, EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE
from database import partitions
from database.retention import Retention
from database.schema import SCHEMA_VERSION
from database.snapshot import SnapshotRefresher, describe
from database.sqs_postgres import PostgresWriter
from database.token_indexes import TOKEN_INDEX_LOCK_ID
from helpers import ROOT, locked_logins, query, wait_until
from main import main
from roles import apply_roles_sql

SNAPSHOT = "user_login_duplicates_snapshot"
REFRESHED = "user_login_duplicates_snapshot_refreshed"
VIEW_COLUMNS = "field, masked_value, logins, users, first_seen, last_seen"


def documented_top_20() -> list[str]:
    """The all-time queries docs/analysts.md gives on the snapshot (the first SQL block of its section)."""
    text = (ROOT / "docs" / "analysts.md").read_text(encoding="utf-8")
    section = text[text.index("## All time: the snapshot") :]
    block = section[section.index("```sql") + len("```sql") : section.index("```", section.index("```sql") + 6)]
    lines = [line for line in block.splitlines() if not line.startswith("--")]
    return [sql.strip() for sql in "\n".join(lines).split(";") if sql.strip()]


def snapshot_rows(database_url: str) -> list[tuple[Any, ...]]:
    return sorted(query(database_url, f"SELECT {VIEW_COLUMNS} FROM {SNAPSHOT}"))


def view_rows(database_url: str) -> list[tuple[Any, ...]]:
    return sorted(query(database_url, f"SELECT {VIEW_COLUMNS} FROM user_login_duplicates"))


def refresh(capsys: pytest.CaptureFixture[str]) -> str:
    """`python main.py snapshot` in-process; its stdout (DATABASE_URL set by the db_env fixture)."""
    capsys.readouterr()
    assert main(["snapshot"]) == EXIT_OK, capsys.readouterr().err
    return capsys.readouterr().out


def assert_snapshot_is_the_view(database_url: str, stored: list[Any]) -> None:
    rows = snapshot_rows(database_url)
    assert rows == view_rows(database_url) == by_hand(stored)
    [(refreshed_at,)] = query(database_url, f"SELECT refreshed_at FROM {REFRESHED}")
    assert isinstance(refreshed_at, datetime)


def test_after_each_refresh_the_snapshot_holds_exactly_the_live_views_rows(db_env, capsys) -> None:
    database_url = db_env
    # GIVEN the ETL's schema, the snapshot created empty: reading it is PostgreSQL's error until refreshed
    stored = load_logins(database_url)  # a redelivered batch, quarantined messages, legacy rows
    with pytest.raises(psycopg2.errors.ObjectNotInPrerequisiteState, match="has not been populated"):
        query(database_url, f"SELECT * FROM {SNAPSHOT}")
    # WHEN it is refreshed the first time
    out = refresh(capsys)
    # THEN plainly (it was empty), and it is the view's rows, counted once per message stored
    rows = len(view_rows(database_url))
    assert f"refreshed for the first time: {rows} rows in " in out and "refreshed_at 20" in out, out
    assert_snapshot_is_the_view(database_url, stored)

    # WHEN every token is rewritten by a rekey: the snapshot still shows the old tokens...
    before = snapshot_rows(database_url)
    rekeyed = rekey_all(database_url, stored)
    assert snapshot_rows(database_url) == before != view_rows(database_url)
    # ... until the next refresh, concurrent this time
    out = refresh(capsys)
    assert "refreshed concurrently" in out, out
    assert_snapshot_is_the_view(database_url, rekeyed)
    assert not any(token.startswith("v1.") for _field, token, *_ in snapshot_rows(database_url))

    # WHEN retention drops OLD_DAY's partition, and the snapshot is refreshed
    assert Retention(database_url, keep_days=3, requested_by="test", allow_redelivered_days=True).run(
        dry_run=False
    ).partitions == [(partitions.partition_name(OLD_DAY), 15)]
    refresh(capsys)
    # THEN the dropped day no longer counts in it
    assert_snapshot_is_the_view(database_url, [r for r in rekeyed if r.create_date != OLD_DAY])


def test_a_concurrent_refresh_with_nothing_changed_rewrites_no_row_of_the_snapshot(db_env) -> None:
    database_url = db_env
    # GIVEN a snapshot refreshed once (plainly), then once concurrently: every row has settled
    load_logins(database_url)
    refresher = SnapshotRefresher(database_url)
    refresher.run()
    first = refresher.run()
    assert first.concurrently and first.rows > 0
    before = _row_places(database_url)
    # WHEN it is refreshed concurrently again, no login having changed since
    second = refresher.run()
    # THEN its refresh time moved on, but no row was deleted and inserted again: each is where it
    # was (a row rewritten by REFRESH … CONCURRENTLY gets a new ctid)
    assert second.concurrently and second.rows == first.rows
    assert first.refreshed_at is not None and second.refreshed_at is not None
    assert second.refreshed_at > first.refreshed_at
    after = _row_places(database_url)
    moved = sorted(key for key in before if after.get(key) != before[key])
    assert not moved, f"{len(moved)} of {len(before)} rows rewritten by a refresh that changed nothing"


def _row_places(database_url: str) -> dict[tuple[str, str], str]:
    """Each snapshot row's physical place (ctid), by its key."""
    rows = query(database_url, f"SELECT field, masked_value, ctid::text FROM {SNAPSHOT}")
    return {(field, token): ctid for field, token, ctid in rows}


def _unindexed_closed(database_url: str) -> set[str]:
    """The closed partitions lacking a token index (absent or INVALID)."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            return {leaf for leaf, _name in partitions.missing_token_indexes(cur, TODAY)}
    finally:
        conn.close()


def test_the_nightly_snapshot_first_builds_the_closed_days_missing_token_indexes(db_env, capsys) -> None:
    database_url = db_env
    # GIVEN logins over closed days and today, which no indexer has seen: no closed day has its indexes
    stored = load_logins(database_url)
    yesterday = partitions.partition_name(TODAY - timedelta(days=1))
    closed = _unindexed_closed(database_url)
    assert {yesterday, partitions.partition_name(OLD_DAY), partitions.DEFAULT_PARTITION} <= closed
    # AND the ETL's indexer at work (it holds the indexer lock of this schema)
    holder = psycopg2.connect(database_url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s, hashtext(current_schema()))", (TOKEN_INDEX_LOCK_ID,))
        # WHEN the nightly job runs: its pass skips, saying so, and the refresh goes on
        lines = refresh(capsys).splitlines()
        assert lines[0] == "token indexes: skipped, another session (the ETL's indexer) is building them", lines
        assert "refreshed for the first time" in lines[1] and _unindexed_closed(database_url) == closed
    finally:
        holder.close()
    # WHEN it runs again, alone
    lines = refresh(capsys).splitlines()
    # THEN it first builds every closed day's two token indexes, printing them, then refreshes
    built = lines[0].removeprefix("token indexes: built ")
    assert built.startswith(f"{len(partitions.TOKEN_INDEXES) * len(closed)} in "), lines
    assert f"{yesterday}_device_user_day" in built and f"{yesterday}_ip_user_day" in built
    assert "refreshed concurrently" in lines[1], lines
    assert _unindexed_closed(database_url) == set()
    # AND today's partition, being written, still has none
    [(today_indexes,)] = query(
        database_url, "SELECT count(*) FROM pg_index WHERE indrelid = %s::regclass", (partitions.partition_name(TODAY),)
    )
    assert today_indexes == 1
    assert_snapshot_is_the_view(database_url, stored)
    # AND the next night finds nothing to build
    assert refresh(capsys).splitlines()[0] == "token indexes: every closed partition has them"


def test_while_a_refresh_runs_the_old_snapshot_stays_readable_and_a_second_refresh_exits_busy(db_env, capsys) -> None:
    database_url = db_env
    # GIVEN a populated snapshot, then more logins (a rekey changes every token)
    stored = load_logins(database_url)
    refresh(capsys)
    old = snapshot_rows(database_url)
    rekeyed = rekey_all(database_url, stored)
    # WHEN a refresh runs and is held mid-way (its lock on the snapshot taken, waiting for user_logins)
    done: list[BaseException | object] = []
    with locked_logins(database_url):
        thread = threading.Thread(
            target=lambda: done.append(_run_refresh(database_url)),
            daemon=True,
        )
        thread.start()
        wait_until(lambda: _waiting_for_user_logins(database_url), "the refresh to wait for user_logins", 30)
        # THEN an analyst reads the previous snapshot meanwhile, without waiting (2 s at most)
        conn = psycopg2.connect(database_url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SET statement_timeout = 2000")
                cur.execute(f"SELECT {VIEW_COLUMNS} FROM {SNAPSHOT}")
                assert sorted(cur.fetchall()) == old
        finally:
            conn.close()
        # AND a second refresh exits at once with the lock's exit code, saying so on one line
        capsys.readouterr()
        assert main(["snapshot"]) == EXIT_BUSY
        err = capsys.readouterr().err
        assert err.startswith("error: another refresh of user_login_duplicates_snapshot is running"), err
        assert err.count("\n") == 1
    # WHEN the lock is released: the first refresh completes, the snapshot is the new view
    thread.join(timeout=30)
    assert not thread.is_alive() and done and not isinstance(done[0], BaseException), done
    assert_snapshot_is_the_view(database_url, rekeyed)


def test_a_refresh_kept_waiting_for_a_lock_past_the_lock_timeout_exits_3_and_keeps_the_snapshot(db_env, capsys) -> None:
    database_url = db_env
    # GIVEN a populated snapshot, and user_logins locked by someone else (a migration, a DROP)
    stored = load_logins(database_url)
    refresh(capsys)
    with locked_logins(database_url):
        # WHEN a refresh runs: it waits the lock timeout (5 s), then gives up
        assert main(["snapshot"]) == EXIT_UNREACHABLE
    # THEN one line says what waited and to rerun; the previous snapshot is intact and readable
    err = capsys.readouterr().err
    assert err.startswith("error: the refresh waited 5000 ms for a lock") and "rerun later" in err, err
    assert "held by pid " in err and " on user_logins" in err, err  # who holds it, never a query's text
    assert_snapshot_is_the_view(database_url, stored)


def _run_refresh(database_url: str) -> BaseException | object:
    try:
        return SnapshotRefresher(database_url, lock_timeout_seconds=60).run()
    except BaseException as exc:  # noqa: BLE001 - shown by the test
        return exc


def _waiting_for_user_logins(database_url: str) -> bool:
    return bool(
        query(
            database_url,
            "SELECT count(*) > 0 FROM pg_locks WHERE NOT granted AND relation = to_regclass('user_logins')",
        )[0][0]
    )


def test_the_snapshots_top_20_queries_read_its_indexes(db_env, capsys) -> None:
    database_url = db_env
    # GIVEN a refreshed snapshot (a few rows: the planner would read them all without an index, so
    # sequential scans are priced out here, as a table of millions of rows prices them)
    load_logins(database_url)
    refresh(capsys)
    queries = documented_top_20()
    assert len(queries) == 4 and all(SNAPSHOT in sql for sql in queries), queries
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET enable_seqscan = off; SET enable_bitmapscan = off")
            for sql in queries:
                cur.execute(sql)
                assert 0 < len(cur.fetchall()) <= 20, sql  # it runs, and answers
                cur.execute(f"EXPLAIN (COSTS OFF) {sql}")
                plan = "\n".join(row[0] for row in cur.fetchall())
                # THEN each is an index scan of the snapshot, in the index's order: no sort, no seq scan
                assert f"Index Scan using {SNAPSHOT}_" in plan, f"{sql}\n{plan}"
                assert "Seq Scan" not in plan and "Sort" not in plan, f"{sql}\n{plan}"
    finally:
        conn.close()


def test_an_unmigrated_schema_is_refused_with_exit_2(db_env, capsys) -> None:
    database_url = db_env
    # GIVEN an empty schema: nothing is created
    assert main(["snapshot"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert "start the ETL once" in err
    assert out == "token indexes: skipped, the schema is not current (tables missing)\n"
    assert query(database_url, "SELECT to_regclass('etl_schema_version')") == [(None,)]
    # AND a schema 4 database (no snapshot yet)
    writer = PostgresWriter(database_url)
    writer.connect()
    writer.close()
    query(database_url, f"DROP MATERIALIZED VIEW {SNAPSHOT}; DELETE FROM etl_schema_version WHERE version > 4")
    assert main(["snapshot"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert f"{SNAPSHOT} does not exist yet" in err
    assert out.startswith("token indexes: skipped, the schema is not current (schema version "), out


def test_a_schema_4_database_gets_the_snapshot_at_start_and_a_rerun_changes_nothing(db_env, capsys) -> None:
    database_url = db_env
    # GIVEN a schema 4 database holding logins
    stored = load_logins(database_url)
    query(database_url, f"DROP MATERIALIZED VIEW {SNAPSHOT}; DELETE FROM etl_schema_version WHERE version > 4")
    # WHEN the ETL starts, twice (the second finds nothing to do), and once more with version 5 unrecorded
    for _ in range(2):
        writer = PostgresWriter(database_url)
        writer.connect()
        writer.close()
    query(database_url, "DELETE FROM etl_schema_version WHERE version >= 5")
    writer = PostgresWriter(database_url)
    writer.connect()  # reruns every migration step on the existing snapshot
    writer.close()
    # THEN schema 5 is recorded, the snapshot and its three indexes exist once, unpopulated, with no
    # refresh time recorded
    assert query(database_url, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)]
    assert query(database_url, "SELECT relispopulated FROM pg_class WHERE oid = to_regclass(%s)", (SNAPSHOT,)) == [
        (False,)
    ]
    indexes = query(
        database_url,
        "SELECT indexname FROM pg_indexes WHERE tablename = %s AND schemaname = current_schema() ORDER BY 1",
        (SNAPSHOT,),
    )
    assert indexes == [(f"{SNAPSHOT}_key",), (f"{SNAPSHOT}_logins",), (f"{SNAPSHOT}_users",)]
    assert query(database_url, f"SELECT count(*) FROM {REFRESHED}") == [(0,)]
    # AND a refresh fills it with the view's rows
    refresh(capsys)
    assert_snapshot_is_the_view(database_url, stored)


def test_a_snapshot_with_the_old_per_row_refreshed_at_is_made_again_empty_at_start(db_env, capsys) -> None:
    database_url = db_env
    # GIVEN a database of unreleased schema 5: the snapshot with refreshed_at in every row, populated,
    # and no table of its refresh time
    stored = load_logins(database_url)
    query(
        database_url,
        f"""DROP MATERIALIZED VIEW {SNAPSHOT}; DROP TABLE {REFRESHED};
            CREATE MATERIALIZED VIEW {SNAPSHOT} AS
            SELECT field, masked_value, logins, users, first_seen, last_seen, now() AS refreshed_at
              FROM user_login_duplicates;
            CREATE UNIQUE INDEX {SNAPSHOT}_key ON {SNAPSHOT} (field, masked_value)""",
    )
    # (not current: `check` says so, and the ETL's start migrates it)
    writer = PostgresWriter(database_url)
    writer.connect(migrate=False)
    assert writer.schema_problem() == f"{REFRESHED} missing (an unreleased schema 5)"
    writer.close()
    assert "older schema 5: start the ETL once" in describe(database_url)  # not an error
    # WHEN the ETL starts
    writer = PostgresWriter(database_url)
    writer.connect()
    writer.close()
    # THEN the snapshot is made again without the column, empty, with its three indexes, and the table
    columns = query(
        database_url,
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 ORDER BY attnum",
        (SNAPSHOT,),
    )
    assert [c for (c,) in columns] == VIEW_COLUMNS.split(", ")
    assert query(database_url, "SELECT relispopulated FROM pg_class WHERE oid = to_regclass(%s)", (SNAPSHOT,)) == [
        (False,)
    ]
    [(indexes,)] = query(
        database_url,
        "SELECT count(*) FROM pg_indexes WHERE tablename = %s AND schemaname = current_schema()",
        (SNAPSHOT,),
    )
    assert indexes == 3
    assert describe(database_url) == "; analysts' snapshot never refreshed: run `python main.py snapshot`"
    # AND the nightly job refreshes it (plainly, as the first time), and check gives its age
    assert "refreshed for the first time" in refresh(capsys)
    assert_snapshot_is_the_view(database_url, stored)
    assert describe(database_url).startswith("; analysts' snapshot refreshed 20")


def test_the_analyst_reads_the_snapshot_and_only_the_etl_role_refreshes_it(
    logins, database_url, monkeypatch, tmp_path, capsys
) -> None:
    # GIVEN the ETL's schema made by its role, roles.sql run again
    writer = PostgresWriter(logins["etl"])
    writer.connect()
    writer.close()
    apply_roles_sql(database_url, logins["roles"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    # WHEN the analyst tries to refresh: refused (exit 2), the snapshot is still unpopulated
    monkeypatch.setenv("DATABASE_URL", logins["analyst"])
    assert main(["snapshot"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert "must be owner" in err
    # (its token-index pass refused too, said on a line: the ETL role builds them)
    assert out.startswith("token indexes: not built, refused by PostgreSQL (42501: "), out
    # WHEN the ETL role refreshes it
    monkeypatch.setenv("DATABASE_URL", logins["etl"])
    assert main(["snapshot"]) == EXIT_OK
    # THEN the analyst reads it, and cannot change it
    assert query(logins["analyst"], f"SELECT count(*) FROM {SNAPSHOT}") == [(0,)]
    # (and when it was refreshed, which it cannot change either)
    [(refreshed_at,)] = query(logins["analyst"], f"SELECT refreshed_at FROM {REFRESHED}")
    assert isinstance(refreshed_at, datetime)
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        query(logins["analyst"], f"UPDATE {REFRESHED} SET refreshed_at = now()")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        query(logins["analyst"], f"REFRESH MATERIALIZED VIEW {SNAPSHOT}")
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        query(logins["analyst"], f"DROP MATERIALIZED VIEW {SNAPSHOT}")
