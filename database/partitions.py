"""Daily range partitions of `user_logins` on create_date: DDL, creation ahead of need, the move of
an unpartitioned (legacy) table into them.

Our own few statements, not pg_partman (docs/partitions.md says why). Every function takes a cursor
inside the caller's transaction; the caller holds the schema advisory lock and has set lock_timeout.

- A day's partition is `user_logins_pYYYYMMDD`, FOR VALUES FROM (day) TO (day + 1), and holds the
  unique index on (message_id, create_date) inherited from the parent: each index holds one day.
- `user_logins_default` catches every row no daily partition covers (a SentTimestamp far off, a
  message without one: 1970-01-01, the original exercise's NULL dates). It never fails a batch.
- Creating a day whose rows already sit in the default partition moves them in the same
  transaction (PostgreSQL would otherwise refuse the new partition).
- Token indexes (schema 5; the third, of the network tokens, schema 7) on each CLOSED partition only
  (a day before today, UTC, and the default partition): `<partition>_device_user_day` on
  (masked_device_id, user_id, create_date), `<partition>_ip_user_day` on (masked_ip, user_id,
  create_date) and `<partition>_network_user_day` on (masked_network, user_id, create_date). They hold every column the
  duplicates view and the analysts' queries read, so the history is read by index-only scans merged
  in token order (docs/analysts.md); today's partition, the one being written, carries the unique
  index only, so the writer pays for no token index (they cost ~14 µs of CPU per row). No index on
  the parent: PostgreSQL would clone it onto every new partition. database/token_indexes.py builds
  them CONCURRENTLY once a day is closed; once built, PostgreSQL keeps them exact (late rows, rekey's
  UPDATE, retention's DROP).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from typing import Any

import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

logger = logging.getLogger(__name__)

TABLE = "user_logins"
DEFAULT_PARTITION = "user_logins_default"
LEGACY_TABLE = "user_logins_legacy"
UNIQUE_KEY = "user_logins_message_id_create_date_key"
# Days created ahead of today, and behind it (yesterday: messages sent before midnight arrive after).
DAYS_AHEAD = 7
DAYS_BEHIND = 1
# After a failed attempt to make the coming days (a lock held), the writer looks again this much
# later: the days are made DAYS_AHEAD ahead, so nothing waits for it, and each attempt queues the
# analysts' queries on user_logins for up to the lock timeout.
RETRY_SECONDS = 60.0
_DAY_NAME = re.compile(r"^user_logins_p(\d{8})$")
# Token index of a closed partition: name suffix -> key columns (`<partition>_<suffix>`).
TOKEN_INDEXES = {
    "device_user_day": "(masked_device_id, user_id, create_date)",
    "ip_user_day": "(masked_ip, user_id, create_date)",
    "network_user_day": "(masked_network, user_id, create_date)",
}
# Schema 4 defined them on the parent (so on every partition, today's too); the migration to 5 drops these.
PARENT_TOKEN_INDEXES = ("user_logins_device_user_day", "user_logins_ip_user_day")

COLUMNS_DDL = """
    user_id          varchar(128),
    device_type      varchar(32),
    masked_ip        varchar(256),
    masked_device_id varchar(256),
    locale           varchar(32),
    app_version      varchar(32),
    create_date      date,
    message_id       varchar(128),
    masked_network   varchar(64)"""
COLUMNS = (
    "user_id",
    "device_type",
    "masked_ip",
    "masked_device_id",
    "locale",
    "app_version",
    "create_date",
    "message_id",
    "masked_network",
)


def partition_name(day: date) -> str:
    """The name of a day's partition."""
    return f"user_logins_p{day:%Y%m%d}"


def day_of(name: str) -> date | None:
    """The day of a daily partition's name; None for any other table."""
    match = _DAY_NAME.match(name)
    if match is None:
        return None
    text = match.group(1)
    return date(int(text[:4]), int(text[4:6]), int(text[6:]))


def utc_today() -> date:
    """Today, UTC: the day the partitions and their closing are reckoned in."""
    return datetime.now(timezone.utc).date()


def window(today: date) -> list[date]:
    """The days that must have a partition on `today`."""
    return [today + timedelta(days=n) for n in range(-DAYS_BEHIND, DAYS_AHEAD + 1)]


def relkind(cur: Cursor, table: str) -> str | None:
    """'p' partitioned, 'r' plain table, None absent (in the current schema)."""
    cur.execute("SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass(%s)", (table,))
    row = cur.fetchone()
    return None if row is None else str(row[0])


def partition_days(cur: Cursor) -> set[date]:
    """The days that have a partition (lock-free: the catalog only)."""
    cur.execute(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass(%s)""",
        (TABLE,),
    )
    return {day for (name,) in cur.fetchall() if (day := day_of(name)) is not None}


def create_partitioned(cur: Cursor) -> None:
    """The partitioned table and its default partition (a new database, or the first migration step)."""
    cur.execute(
        f"CREATE TABLE {TABLE} ({COLUMNS_DDL},\n    CONSTRAINT {UNIQUE_KEY} UNIQUE (message_id, create_date)"
        "\n) PARTITION BY RANGE (create_date)"
    )
    cur.execute(f"CREATE TABLE {DEFAULT_PARTITION} PARTITION OF {TABLE} DEFAULT")


# -- the token indexes of closed partitions (schema 5) -------------------------------------------


def drop_parent_token_indexes(cur: Cursor) -> None:
    """Schema 4 -> 5: drop the parent's token indexes, and with them every partition's attached one.

    The closed days get theirs back, one partition at a time and CONCURRENTLY, from
    database/token_indexes.py while the ETL runs.
    """
    cur.execute(f"DROP INDEX IF EXISTS {', '.join(PARENT_TOKEN_INDEXES)}")


def is_closed(leaf: str, today: date) -> bool:
    """True for a partition no longer written in bulk: a day before `today`, or the default partition."""
    if leaf == DEFAULT_PARTITION:
        return True
    day = day_of(leaf)
    return day is not None and day < today


def token_index_names(leaf: str) -> dict[str, str]:
    """A partition's token indexes: name -> key columns."""
    return {f"{leaf}_{suffix}": columns for suffix, columns in TOKEN_INDEXES.items()}


def token_index_state(cur: Cursor) -> dict[str, dict[str, bool | None]]:
    """For every partition: each of its token index names -> True valid, False INVALID, None absent.

    Catalog only, no lock on the tables.
    """
    cur.execute(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = to_regclass(%s) ORDER BY c.relname""",
        (TABLE,),
    )
    leaves = [str(name) for (name,) in cur.fetchall()]
    names = [name for leaf in leaves for name in token_index_names(leaf)]
    cur.execute(
        """SELECT n.name, x.indisvalid FROM unnest(%s::text[]) AS n(name)
             JOIN pg_index x ON x.indexrelid = to_regclass(n.name)""",
        (names,),
    )
    found = {str(name): bool(valid) for name, valid in cur.fetchall()}
    return {leaf: {name: found.get(name) for name in token_index_names(leaf)} for leaf in leaves}


def missing_token_indexes(cur: Cursor, today: date) -> list[tuple[str, str]]:
    """(partition, index name) of each token index a closed partition lacks (absent or INVALID)."""
    return [
        (leaf, name)
        for leaf, indexes in token_index_state(cur).items()
        if is_closed(leaf, today)
        for name, valid in indexes.items()
        if not valid
    ]


def ensure_days(cur: Cursor, days: list[date]) -> list[date]:
    """Create the partitions of `days` that are missing; return the days created.

    Rows of such a day already in the default partition are moved into the new one.
    """
    have = partition_days(cur)
    created = []
    for day in sorted(set(days) - have):
        name = partition_name(day)
        cur.execute(f"SELECT EXISTS (SELECT 1 FROM {DEFAULT_PARTITION} WHERE create_date = %s)", (day,))
        stranded = bool(cur.fetchone()[0])  # type: ignore[index]
        if stranded:
            cur.execute(
                f"CREATE TEMP TABLE stranded ON COMMIT DROP AS WITH moved AS ("
                f"DELETE FROM {DEFAULT_PARTITION} WHERE create_date = %s RETURNING *) SELECT * FROM moved",
                (day,),
            )
            logger.info("moving %d rows dated %s from %s into %s", cur.rowcount, day, DEFAULT_PARTITION, name)
        cur.execute(
            f"CREATE TABLE {name} PARTITION OF {TABLE} FOR VALUES FROM (%s) TO (%s)", (day, day + timedelta(days=1))
        )
        if stranded:
            cur.execute(f"INSERT INTO {TABLE} SELECT * FROM stranded")
            cur.execute("DROP TABLE stranded")
        created.append(day)
    if created:
        logger.info("created %d daily partition(s) of %s: %s .. %s", len(created), TABLE, created[0], created[-1])
    return created


# -- the move of an unpartitioned table --------------------------------------------------------


def dependent_views(cur: Cursor, table: str) -> list[tuple[str, str]]:
    """(name, definition) of the views that read `table`, other than our duplicates view."""
    cur.execute(
        """SELECT DISTINCT v.oid::regclass::text, pg_get_viewdef(v.oid)
             FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
            WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = to_regclass(%s) AND v.oid <> d.refobjid
              AND v.relname <> 'user_login_duplicates'""",
        (table,),
    )
    return [(str(name), str(definition)) for name, definition in cur.fetchall()]


def start_legacy_move(cur: Cursor) -> None:
    """Rename the plain `user_logins` to user_logins_legacy and put the partitioned table in its place.

    One transaction: the grants and owner of the table carry over; views reading it are re-pointed
    at the new table where this role may (CREATE OR REPLACE keeps their owner and grants); the rows
    are moved afterwards, batch by batch (`move_legacy_batch`).
    """
    views = dependent_views(cur, TABLE)
    cur.execute(
        """SELECT pg_get_userbyid(c.relowner), a.grantee, a.privilege_type, a.is_grantable
             FROM pg_class c LEFT JOIN LATERAL aclexplode(c.relacl) a ON true
            WHERE c.oid = to_regclass(%s)""",
        (TABLE,),
    )
    acl = cur.fetchall()
    cur.execute("DROP VIEW IF EXISTS user_login_duplicates")
    cur.execute(f"ALTER TABLE {TABLE} RENAME TO {LEGACY_TABLE}")
    cur.execute(f"SELECT DISTINCT create_date FROM {LEGACY_TABLE} WHERE create_date IS NOT NULL")
    days = [row[0] for row in cur.fetchall()]
    create_partitioned(cur)
    ensure_days(cur, days)
    owner = acl[0][0] if acl else None
    cur.execute("SELECT current_user")
    if owner and owner != cur.fetchone()[0]:  # type: ignore[index]
        owner_to = sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.Identifier(TABLE), sql.Identifier(owner))
        _try(cur, owner_to.as_string(cur), "keep the table's owner")
    for _owner, grantee, privilege, grantable in acl:
        if grantee is None:
            continue
        cur.execute(
            "SELECT CASE WHEN %s::oid = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(%s)) END", (grantee, grantee)
        )
        role = cur.fetchone()[0]  # type: ignore[index]
        _try(
            cur,
            f"GRANT {privilege} ON {TABLE} TO {role}{' WITH GRANT OPTION' if grantable else ''}",
            f"grant {privilege} to {role}",
        )
    for name, definition in views:
        if not _try(cur, f"CREATE OR REPLACE VIEW {name} AS {definition}", f"re-point the view {name}"):
            logger.warning(
                "the view %s still reads %s: run database/roles.sql again (it re-creates it); "
                "%s is dropped once nothing reads it",
                name,
                LEGACY_TABLE,
                LEGACY_TABLE,
            )
    logger.info("%s is now partitioned by day; moving its %d day(s) of rows from %s", TABLE, len(days), LEGACY_TABLE)


def _try(cur: Cursor, statement: str, what: str) -> bool:
    cur.execute("SAVEPOINT attempt")
    try:
        cur.execute(statement)
    except Exception as exc:  # noqa: BLE001 - a right this role lacks: say so, keep migrating
        cur.execute("ROLLBACK TO SAVEPOINT attempt")
        logger.warning("migration could not %s (%s)", what, str(exc).strip().splitlines()[0])
        return False
    cur.execute("RELEASE SAVEPOINT attempt")
    return True


def legacy_pages(cur: Cursor) -> int:
    """Pages of the legacy table (0 if gone)."""
    cur.execute(
        "SELECT coalesce(pg_relation_size(to_regclass(%s)), 0) / current_setting('block_size')::int", (LEGACY_TABLE,)
    )
    return int(cur.fetchone()[0])  # type: ignore[index]


def move_legacy_batch(cur: Cursor, first_page: int, pages: int) -> int:
    """Move the rows of a range of the legacy table's pages into the partitions; return how many.

    One statement (DELETE … RETURNING feeding INSERT): each row is moved exactly once, or not at
    all if the transaction dies. The original exercise's table (integer app_version, no
    message_id) is converted on the way.
    """
    cur.execute(
        """SELECT column_name FROM information_schema.columns
            WHERE table_schema = current_schema() AND table_name = %s""",
        (LEGACY_TABLE,),
    )
    present = {row[0] for row in cur.fetchall()}
    values = ", ".join(
        ("app_version::text AS app_version" if c == "app_version" else c) if c in present else f"NULL AS {c}"
        for c in COLUMNS
    )
    cur.execute(
        f"""WITH moved AS (DELETE FROM {LEGACY_TABLE} WHERE ctid >= %s::tid AND ctid < %s::tid RETURNING {values})
            INSERT INTO {TABLE} ({", ".join(COLUMNS)}) SELECT {", ".join(COLUMNS)} FROM moved""",
        (f"({first_page},0)", f"({first_page + pages},0)"),
    )
    return int(cur.rowcount)


def finish_legacy_move(cur: Cursor) -> bool:
    """Drop the legacy table once it is empty and nothing reads it; True if dropped."""
    cur.execute(f"SELECT EXISTS (SELECT 1 FROM {LEGACY_TABLE})")
    if cur.fetchone()[0]:  # type: ignore[index]
        return False
    readers = dependent_views(cur, LEGACY_TABLE)
    if readers:
        logger.warning(
            "%s is empty but still read by %s: run database/roles.sql again, then restart; it is dropped then",
            LEGACY_TABLE,
            ", ".join(name for name, _ in readers),
        )
        return False
    cur.execute(f"DROP TABLE {LEGACY_TABLE}")
    logger.info("migration to daily partitions done: %s dropped", LEGACY_TABLE)
    return True


class DailyPartitions:
    """A writer's view of the daily partitions: made at its connect (`ensure`), then looked at once
    per UTC day from its write path (`ensure_daily`: a date compared, most of the time).

    `run(work, commit=...)` runs `work(cursor)` in one transaction (the writer's). Partitions are
    looked for without a lock and created only when missing, under the schema advisory lock
    (`lock_id`) and `lock_timeout_ms` (creating a partition locks the parent table). At `ensure_daily`
    a lock held by someone else is not waited out: the rows go to the days already made (and the
    default partition), and the next look comes RETRY_SECONDS later.
    """

    def __init__(self, *, lock_timeout_ms: int, lock_id: int, holders: Callable[[Cursor], str]) -> None:
        self._lock_timeout_ms = lock_timeout_ms
        self._lock_id = lock_id
        self._holders = holders
        self.days: set[date] = set()
        self._checked_on: date | None = None
        self._retry_at = 0.0

    def ensure(self, run: Callable[..., Any], today: date) -> None:
        """The partitions of yesterday, today and the next days; raises LockNotAvailable."""
        days = window(today)
        have: set[date] = run(partition_days, commit=False)
        if not have.issuperset(days):

            def create(cur: Cursor) -> None:
                cur.execute(f"SET LOCAL lock_timeout = {self._lock_timeout_ms}")
                cur.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_id,))
                ensure_days(cur, days)

            run(create)
            have = run(partition_days, commit=False)
        self.days = have
        self._checked_on = today

    def ensure_daily(self, run: Callable[..., Any]) -> None:
        """`ensure` once per UTC day; a lock held: a warning, and a look again RETRY_SECONDS later."""
        today = utc_today()
        if today == self._checked_on or time.monotonic() < self._retry_at:
            return
        try:
            self.ensure(run, today)
        except psycopg2.errors.LockNotAvailable:
            self._retry_at = time.monotonic() + RETRY_SECONDS
            logger.warning(
                "creating the coming days' partitions waited %d ms for a lock %s; trying again in %.0f s",
                self._lock_timeout_ms,
                run(self._holders, commit=False),
                RETRY_SECONDS,
            )
