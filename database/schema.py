"""The schema of user_logins and its neighbours: its history as named versions, the idempotent
steps that bring a database of any earlier version (or none) to the last, and what tells whether a
database is current. database/partitions.py holds the daily partitions' own DDL."""

from __future__ import annotations

import logging
import time
from functools import partial

from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from database import key_checks, partitions
from database.connection import one_row, transaction

logger = logging.getLogger(__name__)

# Any constant: serialises schema set-up between processes starting at once.
SCHEMA_LOCK_ID = 7_412_350_191
# Bumped by every transaction that quarantines a redelivered message (sqs_postgres.PostgresWriter.write).
QUARANTINE_EPOCH = "etl_quarantine_epoch"

# The schema's history: version, and what it brought. migrate() runs the same idempotent steps
# whatever the version found, so a database skips straight to the last.
HISTORY = (
    (1, "user_logins and user_logins_rejected, keyed by the SQS message id"),
    (2, "the analysts' user_login_duplicates view"),
    (3, "daily partitions of user_logins; replay's columns and the user_logins_replayed view"),
    (4, "token indexes for the analysts' queries, on the parent table"),
    (5, "the all-time snapshot of the duplicates view; token indexes on closed days only"),
    (6, "etl_key_checks, the check value of each key version (key_checks.py)"),
    (7, "the network token masked_network: a column, a field of the duplicates view, a closed-day index"),
    (8, "the sequence etl_quarantine_epoch: a message in one table across consumers"),
)
SCHEMA_VERSION = HISTORY[-1][0]

# user_logins' columns in COPY order: the two nullable values, `locale` and `masked_network`, last.
LOGIN_COLUMNS = (
    "message_id",
    "user_id",
    "device_type",
    "masked_ip",
    "masked_device_id",
    "app_version",
    "create_date",
    "locale",
    "masked_network",
)
COLUMN_LIST = ", ".join(LOGIN_COLUMNS)

_CREATE_REJECTED = """
CREATE TABLE IF NOT EXISTS user_logins_rejected (
    message_id     varchar(128) PRIMARY KEY,
    reason         text        NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now(),
    sent_at        timestamptz,
    receive_count  integer     NOT NULL DEFAULT 1,
    encrypted_body text        NOT NULL
)"""

# For analysts: every masked device id or IP seen more than once, with how many logins and users.
CREATE_DUPLICATES_VIEW = """
CREATE OR REPLACE VIEW user_login_duplicates AS
SELECT 'device_id'::text AS field, masked_device_id AS masked_value, count(*) AS logins,
       count(DISTINCT user_id) AS users, min(create_date) AS first_seen, max(create_date) AS last_seen
  FROM user_logins WHERE masked_device_id IS NOT NULL
 GROUP BY masked_device_id HAVING count(*) > 1
UNION ALL
SELECT 'ip'::text, masked_ip, count(*), count(DISTINCT user_id), min(create_date), max(create_date)
  FROM user_logins WHERE masked_ip IS NOT NULL
 GROUP BY masked_ip HAVING count(*) > 1
UNION ALL
SELECT 'network'::text, masked_network, count(*), count(DISTINCT user_id), min(create_date), max(create_date)
  FROM user_logins WHERE masked_network IS NOT NULL
 GROUP BY masked_network HAVING count(*) > 1"""


# For analysts' all-time top 20: the view's answer stored, refreshed by `python main.py snapshot`
# (database/snapshot.py). Made WITH NO DATA (instant); each statement idempotent.
SNAPSHOT_VIEW = "user_login_duplicates_snapshot"
# When it was refreshed: one row, written by the refresh in its own transaction. Not a column of the
# view: a value new in every row at each refresh made REFRESH … CONCURRENTLY delete and insert every
# row (tens of millions at 100M logins), not only the rows whose counts changed.
SNAPSHOT_REFRESHED = "user_login_duplicates_snapshot_refreshed"
_CREATE_SNAPSHOT = (
    f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {SNAPSHOT_VIEW} AS
SELECT field, masked_value, logins, users, first_seen, last_seen
  FROM user_login_duplicates
WITH NO DATA""",
    # REFRESH … CONCURRENTLY needs a unique index on plain columns covering every row.
    f"CREATE UNIQUE INDEX IF NOT EXISTS {SNAPSHOT_VIEW}_key ON {SNAPSHOT_VIEW} (field, masked_value)",
    # The top 20 of one field by logins, or by users: the first 20 entries of one of these.
    f"CREATE INDEX IF NOT EXISTS {SNAPSHOT_VIEW}_logins ON {SNAPSHOT_VIEW} (field, logins DESC)",
    f"CREATE INDEX IF NOT EXISTS {SNAPSHOT_VIEW}_users ON {SNAPSHOT_VIEW} (field, users DESC)",
    # `only_row` (true, the key) keeps it to one row, which the refresh upserts.
    f"""CREATE TABLE IF NOT EXISTS {SNAPSHOT_REFRESHED} (
    only_row     boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    refreshed_at timestamptz NOT NULL
)""",
)


def _drop_snapshot_with_refreshed_at_column(cur: Cursor) -> None:
    """Drop the snapshot if it has the per-row `refreshed_at` of unreleased schema 5 (dev and test
    databases made before it moved to its own table): made again by _CREATE_SNAPSHOT WITH NO DATA,
    instant (its next refresh is a plain one). Its indexes and grants go with it (roles.sql regrants)."""
    cur.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'refreshed_at' AND NOT attisdropped",
        (SNAPSHOT_VIEW,),
    )
    if cur.fetchone() is not None:
        cur.execute(f"DROP MATERIALIZED VIEW {SNAPSHOT_VIEW}")  # no CASCADE: an analyst's view on it stops us


# For analysts (who cannot read the quarantine): which rows of user_logins were loaded by a replay.
_CREATE_REPLAYED_VIEW = """
CREATE OR REPLACE VIEW user_logins_replayed AS
SELECT message_id, replayed_at, replay_audit_id, reason AS quarantine_reason
  FROM user_logins_rejected WHERE replayed_at IS NOT NULL"""


def migrate(conn: Connection, *, lock_timeout_ms: int, legacy_batch_pages: int) -> None:
    """Bring the schema to SCHEMA_VERSION: under a session advisory lock (two processes starting at
    once take turns, the second finds everything in place), in several transactions: the move of a
    legacy table commits batch by batch, so a killed migration resumes where it stopped. No lock is
    waited for longer than `lock_timeout_ms` (LockNotAvailable)."""

    def lock(cur: Cursor) -> None:
        cur.execute(f"SET lock_timeout = {lock_timeout_ms}")
        cur.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_ID,))

    transaction(conn, lock)
    try:
        transaction(conn, _tables)
        _move_legacy(conn, legacy_batch_pages)
        transaction(conn, _views)
    finally:
        if not conn.closed:
            transaction(
                conn, lambda cur: cur.execute("SELECT pg_advisory_unlock(%s); RESET lock_timeout", (SCHEMA_LOCK_ID,))
            )


def _tables(cur: Cursor) -> None:
    cur.execute(_CREATE_REJECTED)
    cur.execute("CREATE INDEX IF NOT EXISTS user_logins_rejected_received_at ON user_logins_rejected (received_at)")
    cur.execute(key_checks.CREATE_TABLE)  # schema 5 -> 6
    cur.execute(f"CREATE SEQUENCE IF NOT EXISTS {QUARANTINE_EPOCH}")  # schema 8
    cur.execute(
        """CREATE TABLE IF NOT EXISTS etl_schema_version (
               version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"""
    )
    kind = partitions.relkind(cur, partitions.TABLE)
    if kind is None:
        partitions.create_partitioned(cur)
    elif kind == "r":
        # Today's table (or the original exercise's: integer app_version, no message_id):
        # renamed, replaced by the partitioned one, its rows moved in batches afterwards.
        partitions.start_legacy_move(cur)
    # Schema 7: the network token (NULL in the rows before it: `backfill-networks` fills them). On a
    # partitioned table a nullable column without a default is a catalog change, instant.
    cur.execute(f"ALTER TABLE {partitions.TABLE} ADD COLUMN IF NOT EXISTS masked_network varchar(64)")
    # Schema 4 -> 5 (a schema 3 goes straight to 5): no token index on the parent, nor so on
    # today's partition; token_indexes.py builds the closed days' own, CONCURRENTLY.
    partitions.drop_parent_token_indexes(cur)
    partitions.ensure_days(cur, partitions.window(partitions.utc_today()))


def _move_legacy(conn: Connection, batch_pages: int) -> None:
    pages = transaction(conn, partitions.legacy_pages, commit=False)
    if (
        pages == 0
        and transaction(conn, lambda cur: partitions.relkind(cur, partitions.LEGACY_TABLE), commit=False) is None
    ):
        return
    page, moved, logged = 0, 0, time.monotonic()
    while page < pages:
        moved += transaction(conn, partial(partitions.move_legacy_batch, first_page=page, pages=batch_pages))
        page += batch_pages
        if time.monotonic() - logged >= 5:
            logger.info(
                "moving %s into daily partitions: page %d of %d, %d rows moved",
                partitions.LEGACY_TABLE,
                min(page, pages),
                pages,
                moved,
            )
            logged = time.monotonic()
    logger.info("moved %d rows from %s into daily partitions", moved, partitions.LEGACY_TABLE)
    transaction(conn, partitions.finish_legacy_move)


def _views(cur: Cursor) -> None:
    cur.execute(CREATE_DUPLICATES_VIEW)
    # `python main.py replay` (database/replay.py) marks the quarantine rows it loaded.
    cur.execute("""ALTER TABLE user_logins_rejected ADD COLUMN IF NOT EXISTS replayed_at timestamptz,
                   ADD COLUMN IF NOT EXISTS replay_audit_id bigint""")
    cur.execute(_CREATE_REPLAYED_VIEW)
    _drop_snapshot_with_refreshed_at_column(cur)
    for sql in _CREATE_SNAPSHOT:  # schema 4 -> 5, with the parent token indexes dropped above
        cur.execute(sql)
    cur.execute("INSERT INTO etl_schema_version (version) VALUES (%s) ON CONFLICT DO NOTHING", (SCHEMA_VERSION,))


def schema_version(cur: Cursor) -> int | None:
    """The schema's version, or None if its tables are not there yet (reads only)."""
    cur.execute("SELECT to_regclass('etl_schema_version')")
    if one_row(cur)[0] is None:
        return None
    cur.execute("SELECT max(version) FROM etl_schema_version")
    version = one_row(cur)[0]
    return None if version is None else int(version)


def schema_problem(cur: Cursor) -> str | None:
    """None if the schema is current, else what is wrong (reads only; raises psycopg2 errors)."""
    cur.execute(
        "SELECT to_regclass('user_logins'), to_regclass('user_logins_rejected'), to_regclass('etl_schema_version')"
    )
    if None in one_row(cur):
        return "tables missing"
    cur.execute("SELECT max(version) FROM etl_schema_version")
    version = one_row(cur)[0]
    if version != SCHEMA_VERSION:
        return f"schema version {version}, expected {SCHEMA_VERSION}"
    if partitions.relkind(cur, partitions.LEGACY_TABLE) is not None:
        return f"{partitions.LEGACY_TABLE} is still being moved into the daily partitions"
    cur.execute("SELECT to_regclass(%s)", (key_checks.TABLE,))
    if one_row(cur)[0] is None:
        return f"{key_checks.TABLE} missing"
    cur.execute("SELECT to_regclass(%s)", (SNAPSHOT_REFRESHED,))
    if one_row(cur)[0] is None:  # unreleased schema 5 (refreshed_at in the snapshot's rows): remade at start
        return f"{SNAPSHOT_REFRESHED} missing (an unreleased schema 5)"
    return None


def create_stage(cur: Cursor, lock_timeout_ms: int) -> None:
    """The session's staging tables for COPY: private to it, emptied at each commit."""
    cur.execute(f"SET LOCAL lock_timeout = {lock_timeout_ms}")
    cur.execute(
        """CREATE TEMP TABLE IF NOT EXISTS user_logins_stage
           (LIKE user_logins INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"""
    )
    # The quarantine rows' COPY target (text columns: a value too long for the table fails the
    # INSERT after it, as a DataError the fallback can pin on its row).
    cur.execute(
        """CREATE TEMP TABLE IF NOT EXISTS user_logins_rejected_stage
           (message_id text, reason text, sent_at timestamptz, receive_count integer,
            encrypted_body text, day date) ON COMMIT DELETE ROWS"""
    )


def lock_holders(cur: Cursor) -> str:
    """Who holds locks on our tables: pid, application, state and since when; never a query's text."""
    cur.execute(
        """SELECT DISTINCT a.pid, coalesce(nullif(a.application_name, ''), '?'), coalesce(a.state, '?'),
                  to_char(a.xact_start AT TIME ZONE 'UTC', 'HH24:MI:SS'),
                  coalesce(c.relname, 'the schema set-up lock')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid LEFT JOIN pg_class c ON c.oid = l.relation
            WHERE l.granted AND l.pid <> pg_backend_pid()
              AND ((c.relnamespace = current_schema()::regnamespace
                    AND (c.relname IN ('user_logins', 'user_logins_rejected', 'user_login_duplicates',
                                       'user_logins_replayed', 'etl_schema_version', 'user_logins_default',
                                       'user_logins_legacy', 'user_login_duplicates_snapshot',
                                       'user_login_duplicates_snapshot_refreshed')
                         OR c.relname LIKE 'user\\_logins\\_p%%'))
                   OR (l.locktype = 'advisory' AND l.objid = %s))
            ORDER BY 1 LIMIT 5""",
        (SCHEMA_LOCK_ID & 0xFFFFFFFF,),
    )
    held = [f"pid {pid} ({app}, {state} since {since} UTC) on {rel}" for pid, app, state, since, rel in cur.fetchall()]
    return "held by " + "; ".join(held) if held else "(its holder has gone)"
