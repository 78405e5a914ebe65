"""user_logins partitioned by day (issue 18), against the real PostgreSQL: exactly-once across
partitions, the default partition, partitions created at once by several ETLs, the in-place
migration of both legacy layouts (also killed and rerun), and retention."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg2
import pytest

from cli.exit_codes import EXIT_OK
from database import partitions
from database.schema import SCHEMA_VERSION
from database.sqs_postgres import PostgresWriter
from database.token_indexes import index_closed_days
from etl.transform import transform
from helpers import connect_at_once, login, query
from main import main
from models import MaskedLogin, ReceivedMessage, WriteResult
from pii.masking import Masker, decode_key, generate_key
from roles import apply_roles_sql, readme_auditor_query
from tests.legacy_tokens import legacy_token

ROOT = Path(__file__).resolve().parents[2]
masker = Masker(bytes(64))
TODAY = datetime.now(timezone.utc).date()


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _received(message_id: str, sent_ms: int | None, n: int = 1) -> ReceivedMessage:
    return ReceivedMessage(message_id, f"receipt-{message_id}", login(n), sent_timestamp_ms=sent_ms)


def _row(message: ReceivedMessage) -> MaskedLogin:
    row = transform(message, masker)
    assert isinstance(row, MaskedLogin)
    return row


def _partition_of(database_url: str, message_id: str) -> list[tuple[str, date]]:
    return query(
        database_url,
        "SELECT tableoid::regclass::text, create_date FROM user_logins WHERE message_id = %s",
        (message_id,),
    )


def test_a_message_redelivered_after_midnight_is_stored_once_in_the_partition_of_its_sent_day(database_url) -> None:
    # GIVEN a message sent one millisecond before midnight UTC yesterday, loaded then
    midnight = datetime.combine(TODAY, datetime.min.time(), timezone.utc)
    late = _received("m-midnight", _ms(midnight) - 1)
    undated = _received("m-undated", None, n=2)
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        assert writer.write([_row(late), _row(undated)], []) == WriteResult(2, 0, 0)
        # WHEN both come back after midnight (a new writer: a restart), straight and as a redelivery
        writer.close()
        writer.connect()
        assert writer.write([_row(late), _row(undated)], []) == WriteResult(0, 0, 2)
        assert writer.write([_row(late), _row(undated)], [], redelivered=True) == WriteResult(0, 0, 2)
    finally:
        writer.close()
    # THEN each is stored once, in the partition of its sent day (1970-01-01 without a SentTimestamp)
    yesterday = TODAY - timedelta(days=1)
    assert _partition_of(database_url, "m-midnight") == [(partitions.partition_name(yesterday), yesterday)]
    assert _partition_of(database_url, "m-undated") == [(partitions.DEFAULT_PARTITION, date(1970, 1, 1))]


def test_a_message_sent_years_off_lands_in_the_default_partition_and_is_counted(database_url, caplog) -> None:
    far = _received("m-far", _ms(datetime(2041, 5, 6, 7, 8, tzinfo=timezone.utc)))
    now = _received("m-now", _ms(datetime.now(timezone.utc)), n=2)
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        with caplog.at_level(logging.WARNING):
            assert writer.write([_row(far), _row(now)], []) == WriteResult(2, 0, 0)
        assert writer.write([_row(far)], []) == WriteResult(0, 0, 1)  # and refused there when it comes back
    finally:
        writer.close()
    assert _partition_of(database_url, "m-far") == [(partitions.DEFAULT_PARTITION, date(2041, 5, 6))]
    assert _partition_of(database_url, "m-now") == [(partitions.partition_name(TODAY), TODAY)]
    assert "1 row(s) of this batch are dated outside the daily partitions" in caplog.text


def test_a_new_day_whose_rows_wait_in_the_default_partition_gets_them_moved_into_its_partition(database_url) -> None:
    day = TODAY + timedelta(days=40)
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        writer.write([_row(_received("m-ahead", _ms(datetime.combine(day, datetime.min.time(), timezone.utc))))], [])
    finally:
        writer.close()
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        assert partitions.ensure_days(cur, [day]) == [day]
    conn.close()
    assert _partition_of(database_url, "m-ahead") == [(partitions.partition_name(day), day)]


def test_two_etls_creating_the_same_new_partitions_at_once_both_start(database_url) -> None:
    # GIVEN a schema whose partitions of today and the next days are missing
    PostgresWriter(database_url).connect()
    for day in partitions.window(TODAY):
        query(database_url, f"DROP TABLE {partitions.partition_name(day)}")
    # WHEN four ETLs start at once
    errors = connect_at_once(database_url)
    # THEN all start, and each day has its one partition
    assert errors == []
    names = {
        name
        for (name,) in query(
            database_url,
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON "
            "c.oid = i.inhrelid WHERE i.inhparent = 'user_logins'::regclass",
        )
    }
    assert {partitions.partition_name(d) for d in partitions.window(TODAY)} <= names


_V2_LAYOUT = """
    CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
        masked_device_id varchar(256), locale varchar(32), app_version varchar(32), create_date date,
        message_id varchar(128), CONSTRAINT user_logins_message_id_key UNIQUE (message_id));
    CREATE TABLE user_logins_rejected (message_id varchar(128) PRIMARY KEY, reason text NOT NULL,
        received_at timestamptz NOT NULL DEFAULT now(), sent_at timestamptz,
        receive_count integer NOT NULL DEFAULT 1, encrypted_body text NOT NULL);
    CREATE TABLE etl_schema_version (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
    INSERT INTO etl_schema_version VALUES (1), (2);
    CREATE VIEW user_login_duplicates AS SELECT masked_device_id, count(*) FROM user_logins GROUP BY 1;
    INSERT INTO user_logins
    SELECT 'user-' || n, 'ios', 'v1.ip' || mod(n, 97), 'v1.dev' || mod(n, 89),
           CASE WHEN mod(n, 3) = 0 THEN NULL ELSE 'RU' END,
           '2.' || mod(n, 7), current_date - (mod(n, 5)), 'msg-' || n
      FROM generate_series(1, %(rows)s) AS n;
"""
_ORIGINAL_LAYOUT = """
    CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
        masked_device_id varchar(256), locale varchar(32), app_version integer, create_date date);
    INSERT INTO user_logins
    SELECT 'user-' || n, 'android', 'ip' || mod(n, 13), 'dev' || mod(n, 11), NULL, mod(n, 4),
           CASE WHEN mod(n, 10) = 0 THEN NULL ELSE date '2020-01-01' + mod(n, 3) END
      FROM generate_series(1, %(rows)s) AS n;
"""
# Every row, as text, in a fixed order: equal before and after means no row lost, added or changed.
_FINGERPRINT = """SELECT count(*), md5(string_agg(concat_ws('|', user_id, device_type, masked_ip, masked_device_id,
                         locale, app_version::text, create_date, %s), ',' ORDER BY user_id)) FROM {table}"""


def _fingerprint(database_url: str, table: str, message_id: str) -> tuple[int, str]:
    [row] = query(database_url, _FINGERPRINT.format(table=table) % message_id)
    return row


def test_todays_table_is_moved_into_daily_partitions_keeping_rows_grants_and_views(database_url) -> None:
    # GIVEN a schema-2 table with its rows over five days, a grant, and a view an administrator made
    query(database_url, _V2_LAYOUT % {"rows": 5000})
    query(
        database_url,
        "GRANT SELECT ON user_logins TO PUBLIC; CREATE VIEW admins_view AS SELECT count(*) AS n FROM user_logins",
    )
    before = _fingerprint(database_url, "user_logins", "message_id")
    # WHEN the ETL starts
    writer = PostgresWriter(database_url, migrate_batch_pages=7)
    writer.connect()
    try:
        assert writer.schema_problem() is None
        # THEN a message loaded before the migration is still refused when it comes back
        old = query(
            database_url,
            "SELECT user_id, device_type, masked_ip, masked_device_id, locale, app_version, "
            "create_date, message_id FROM user_logins WHERE message_id = 'msg-42'",
        )[0]
        again = MaskedLogin(old[7], old[0], old[1], old[2], old[3], old[4], old[5], old[6])
        assert writer.write([again], []) == WriteResult(0, 0, 1)
    finally:
        writer.close()
    # AND every row is there, in the partition of its day, the grant and the views carried over
    assert _fingerprint(database_url, "user_logins", "message_id") == before
    assert query(database_url, "SELECT count(*) FROM ONLY user_logins_default") == [(0,)]
    assert query(
        database_url,
        "SELECT count(*) FROM user_logins WHERE tableoid::regclass::text <> "
        "'user_logins_p' || to_char(create_date, 'YYYYMMDD')",
    ) == [(0,)]
    assert query(
        database_url, "SELECT relkind, relacl::text LIKE '%%=r/%%' FROM pg_class WHERE oid = 'user_logins'::regclass"
    ) == [("p", True)]
    assert query(database_url, "SELECT n FROM admins_view") == [(5000,)]
    assert query(database_url, "SELECT to_regclass('user_logins_legacy')") == [(None,)]
    assert query(database_url, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)]
    # AND no token index on the parent (schema 5): the closed days, listed as missing, get theirs
    # from the indexer (the five past days of the rows, and the default partition)
    assert query(database_url, "SELECT to_regclass(%s), to_regclass(%s)", partitions.PARENT_TOKEN_INDEXES) == [
        (None, None)
    ]
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            assert len({leaf for leaf, _name in partitions.missing_token_indexes(cur, TODAY)}) == 5
        assert len(index_closed_days(conn, TODAY).built) == 5 * len(partitions.TOKEN_INDEXES)
        with conn, conn.cursor() as cur:
            assert partitions.missing_token_indexes(cur, TODAY) == []
    finally:
        conn.close()


def test_the_original_exercise_table_is_moved_into_partitions_converted_and_complete(database_url) -> None:
    query(database_url, _ORIGINAL_LAYOUT % {"rows": 3000})
    before = _fingerprint(database_url, "user_logins", "NULL")
    PostgresWriter(database_url, migrate_batch_pages=5).connect()
    assert _fingerprint(database_url, "user_logins", "message_id") == before
    assert query(database_url, "SELECT count(*) FROM ONLY user_logins_default") == [(300,)]  # the NULL dates
    assert query(database_url, "SELECT count(*), count(message_id) FROM user_logins_p20200102") == [(900, 0)]


def _kill_the_migration_mid_move(database_url: str, dsn: str | None = None) -> None:
    """Start the ETL's migration in a child process and SIGKILL it once some rows have moved."""
    code = (
        "import sys; from database.sqs_postgres import PostgresWriter; "
        "PostgresWriter(sys.argv[1], migrate_batch_pages=1).connect()"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, dsn or database_url], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if (
            query(database_url, "SELECT to_regclass('user_logins_legacy') IS NOT NULL")[0][0]
            and query(database_url, "SELECT count(*) FROM user_logins")[0][0] > 5000
        ):
            break
        time.sleep(0.05)
    assert process.poll() is None, "the migration finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


@pytest.mark.parametrize(
    ("layout", "message_id"), [(_V2_LAYOUT, "message_id"), (_ORIGINAL_LAYOUT, "NULL")], ids=["schema-2", "original"]
)
def test_a_migration_killed_mid_move_resumes_and_keeps_every_row(database_url, layout: str, message_id: str) -> None:
    # GIVEN a legacy table (today's, or the original exercise's: no message_id, integer app_version)
    # large enough that moving it a page at a time takes a while
    query(database_url, layout % {"rows": 60000})
    before = _fingerprint(database_url, "user_logins", message_id)
    # WHEN the migrating process is SIGKILLed once some rows have moved
    _kill_the_migration_mid_move(database_url)
    moved, left = query(
        database_url, "SELECT (SELECT count(*) FROM user_logins), (SELECT count(*) FROM user_logins_legacy)"
    )[0]
    assert moved > 0 and left > 0 and moved + left == 60000  # nothing lost or doubled by the kill
    # THEN a rerun finishes the move with every row intact: same count, same values, none doubled
    PostgresWriter(database_url, migrate_batch_pages=500).connect()
    assert _fingerprint(database_url, "user_logins", "message_id") == before
    assert query(database_url, "SELECT to_regclass('user_logins_legacy')") == [(None,)]
    assert query(database_url, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)]


def _v2_table_with_tokens(database_url: str, key: str, rows: int, audited: list[str]) -> None:
    """A schema-2 table: `rows` rows holding legacy `v1.` tokens (rekey rewrites them), between a first
    and a last row whose device tokens are of today's format (rekey leaves them: `audited`)."""
    legacy = decode_key(key)
    ips = [legacy_token(legacy, 1, "ip", f"10.0.{n}.1") for n in range(97)]
    devices = [legacy_token(legacy, 1, "device_id", f"device-{n}") for n in range(89)]
    first, last = audited
    query(
        database_url,
        """CREATE TABLE user_logins (user_id varchar(128), device_type varchar(32), masked_ip varchar(256),
               masked_device_id varchar(256), locale varchar(32), app_version varchar(32), create_date date,
               message_id varchar(128), CONSTRAINT user_logins_message_id_key UNIQUE (message_id));
           CREATE TABLE user_logins_rejected (message_id varchar(128) PRIMARY KEY, reason text NOT NULL,
               received_at timestamptz NOT NULL DEFAULT now(), sent_at timestamptz,
               receive_count integer NOT NULL DEFAULT 1, encrypted_body text NOT NULL);
           CREATE TABLE etl_schema_version (version integer PRIMARY KEY,
               applied_at timestamptz NOT NULL DEFAULT now());
           INSERT INTO etl_schema_version VALUES (1), (2);
           INSERT INTO user_logins VALUES ('audit-first', 'ios', NULL, %(first)s, NULL, '1.0', current_date, 'm-first');
           INSERT INTO user_logins
           SELECT 'user-' || n, 'ios', (%(ips)s::text[])[1 + mod(n, 97)], (%(devices)s::text[])[1 + mod(n, 89)],
                  NULL, '1.0', current_date - mod(n, 5), 'msg-' || n
             FROM generate_series(1, %(rows)s) AS n;
           INSERT INTO user_logins
           VALUES ('audit-last', 'ios', NULL, %(last)s, NULL, '1.0', current_date, 'm-last');""",
        {"first": first, "last": last, "ips": ips, "devices": devices, "rows": rows},  # type: ignore[arg-type]
    )


def _tokens_unmask_to_their_values(database_url: str, keyed: Masker) -> int:
    """Every token, wherever its row is (partitions or the legacy table), unmasks to its value; how many."""
    tables = ["user_logins"] + (
        ["user_logins_legacy"] if query(database_url, "SELECT to_regclass('user_logins_legacy')")[0][0] else []
    )
    checked = 0
    for table in tables:
        for user_id, masked_ip, masked_device_id in query(
            database_url, f"SELECT user_id, masked_ip, masked_device_id FROM {table} WHERE user_id LIKE 'user-%%'"
        ):
            n = int(user_id.split("-")[1])
            assert masked_ip.startswith(keyed.current_prefixes) and masked_device_id.startswith(keyed.current_prefixes)
            assert keyed.unmask(masked_ip) == f"10.0.{n % 97}.1"
            assert keyed.unmask(masked_device_id) == f"device-{n % 89}"
            checked += 1
    return checked


def test_rekey_and_the_auditors_view_work_on_a_half_migrated_database(
    logins, database_url, monkeypatch, tmp_path, capsys
) -> None:
    # GIVEN a schema-2 table of legacy tokens, the roles of database/roles.sql (run after the tables
    # exist), and an unmask of the first and the last row's device, audited before the migration
    key = generate_key()
    keyed = Masker(decode_key(key))
    audited = [keyed.mask("device_id", "audited-first"), keyed.mask("device_id", "audited-last")]
    _v2_table_with_tokens(database_url, key, 60000, audited)
    apply_roles_sql(database_url, logins["roles"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKING_KEY", key)
    monkeypatch.setenv("DATABASE_URL", logins["unmask"])
    assert main(["unmask", "--reason", "case 18", "--requested-by", "carol", *audited]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["audited-first", "audited-last"]
    expected = [
        ("carol", "case 18", ("user_logins", "m-first", "audit-first", "device_id")),
        ("carol", "case 18", ("user_logins", "m-last", "audit-last", "device_id")),
    ]
    assert [(r[1], r[2], r[-4:]) for r in query(logins["auditor"], readme_auditor_query())] == expected

    # WHEN the ETL (as its role) is SIGKILLed mid-move, and rekey runs (as the CLI does) meanwhile
    _kill_the_migration_mid_move(database_url, dsn=logins["etl"])
    monkeypatch.setenv("DATABASE_URL", logins["etl"])
    assert main(["rekey", "--batch-size", "700"]) == EXIT_OK
    # THEN every token, moved or not yet, unmasks to its value (rekeyed to today's format)
    assert query(database_url, "SELECT to_regclass('user_logins_legacy') IS NOT NULL") == [(True,)]
    assert _tokens_unmask_to_their_values(database_url, keyed) == 60000
    # AND the auditor still finds both rows of the unmask audited before the migration
    assert [(r[1], r[2], r[-4:]) for r in query(logins["auditor"], readme_auditor_query())] == expected

    # WHEN the migration is rerun and finishes, and roles.sql is run again (docs/partitions.md)
    PostgresWriter(logins["etl"]).connect()
    apply_roles_sql(database_url, logins["roles"])
    PostgresWriter(logins["etl"]).connect()
    # THEN the same holds, on the partitioned table alone
    assert query(database_url, "SELECT to_regclass('user_logins_legacy')") == [(None,)]
    assert _tokens_unmask_to_their_values(database_url, keyed) == 60000
    assert [(r[1], r[2], r[-4:]) for r in query(logins["auditor"], readme_auditor_query())] == expected


def _seed_days(database_url: str, days: list[date]) -> None:
    conn = psycopg2.connect(database_url)
    with conn, conn.cursor() as cur:
        partitions.ensure_days(cur, days)
        for n, day in enumerate(days):
            cur.execute(
                "INSERT INTO user_logins (user_id, create_date, message_id) VALUES (%s, %s, %s)",
                (f"user-{n}", day, f"m-{day}"),
            )
    conn.close()


def test_retention_drops_only_what_is_older_than_keep_days_and_nothing_in_a_dry_run(db_env, capsys) -> None:
    # GIVEN partitions from 10 days ago to the ones created ahead, a far-past row in the default
    # partition, and two quarantined messages, one received 20 days ago
    PostgresWriter(db_env).connect()
    days = [TODAY - timedelta(days=n) for n in range(10, -3, -1)]
    _seed_days(db_env, days)
    query(db_env, "INSERT INTO user_logins (user_id, create_date, message_id) VALUES ('old', '2001-01-01', 'm-old')")
    query(
        db_env,
        "INSERT INTO user_logins_rejected (message_id, reason, received_at, encrypted_body) VALUES "
        "('r-old', 'x', now() - interval '20 days', 'v1.x'), ('r-new', 'x', now(), 'v1.y')",
    )
    everything = query(db_env, "SELECT tableoid::regclass::text, message_id FROM user_logins ORDER BY 2")

    # WHEN a dry run keeps 3 days
    assert main(["retention", "--keep-days", "3", "--allow-redelivered-days", "--dry-run"]) == EXIT_OK
    # THEN it says what it would drop and changes nothing
    out = capsys.readouterr().out
    assert "would drop 7 partition(s) of user_logins (7 rows" in out
    assert "would delete 1 rows of user_logins_default and 1 of user_logins_rejected" in out
    assert query(db_env, "SELECT tableoid::regclass::text, message_id FROM user_logins ORDER BY 2") == everything
    assert query(db_env, "SELECT to_regclass('etl_retention_audit') IS NULL") == [(True,)]  # not even made

    # WHEN it runs for real
    assert main(["retention", "--keep-days", "3", "--allow-redelivered-days", "--requested-by", "dpo"]) == EXIT_OK
    # THEN days before today-3 are gone, the rest (today, yesterday, those ahead) untouched, and audited
    kept = {d for (d,) in query(db_env, "SELECT create_date FROM user_logins")}
    assert kept == {d for d in days if d >= TODAY - timedelta(days=3)}
    assert query(db_env, "SELECT message_id FROM user_logins_rejected") == [("r-new",)]
    audit = query(db_env, "SELECT requested_by, keep_days, action, object, rows FROM etl_retention_audit ORDER BY id")
    assert len(audit) == 9 and {a[:2] for a in audit} == {("dpo", 3)}
    assert [a[2:] for a in audit[-2:]] == [
        ("delete rows", "user_logins_default", 1),
        ("delete rows", "user_logins_rejected", 1),
    ]
    assert ("drop partition", partitions.partition_name(TODAY - timedelta(days=10)), 1) in [a[2:] for a in audit]
    # AND the ETL still writes to today's partition
    writer = PostgresWriter(db_env)
    writer.connect()
    try:
        assert writer.write([_row(_received("m-after", _ms(datetime.now(timezone.utc))))], []).inserted == 1
    finally:
        writer.close()
    # AND a second run finds nothing more to drop
    capsys.readouterr()
    assert main(["retention", "--keep-days", "3", "--allow-redelivered-days"]) == EXIT_OK
    assert "dropped 0 partition(s)" in capsys.readouterr().out


def test_retention_keeps_an_undated_message_and_says_so_even_in_a_dry_run(db_env, capsys) -> None:
    # GIVEN a message without SentTimestamp (dated 1970-01-01: it may have been sent a minute ago)
    # and a row sent long ago, both in the default partition
    writer = PostgresWriter(db_env)
    writer.connect()
    try:
        assert writer.write([_row(_received("m-undated", None))], []).inserted == 1
    finally:
        writer.close()
    query(db_env, "INSERT INTO user_logins (user_id, create_date, message_id) VALUES ('old', '2001-01-01', 'm-old')")
    # WHEN a dry run, then a real run, keep the days SQS may still redeliver
    assert main(["retention", "--keep-days", "15", "--dry-run"]) == EXIT_OK
    # THEN the dry run would delete only the dated old row and reports the undated one as kept
    out = capsys.readouterr().out
    assert "would delete 1 rows of user_logins_default" in out
    assert "kept 1 undated rows (no SentTimestamp: their age is unknown)" in out
    assert main(["retention", "--keep-days", "15"]) == EXIT_OK
    assert "kept 1 undated rows" in capsys.readouterr().out
    # AND the undated message is still stored, and still refused when it comes back
    assert _partition_of(db_env, "m-undated") == [(partitions.DEFAULT_PARTITION, date(1970, 1, 1))]
    assert query(db_env, "SELECT count(*) FROM user_logins WHERE message_id = 'm-old'") == [(0,)]
    writer.connect()
    try:
        assert writer.write([_row(_received("m-undated", None))], [], redelivered=True) == WriteResult(0, 0, 1)
    finally:
        writer.close()
