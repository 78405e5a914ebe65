"""The analysts' token indexes on the closed days of `user_logins`, built CONCURRENTLY, off the
writer's path (schema 5; docs/partitions.md, "Analysts at scale").

Today's and the coming days' partitions carry only the unique index: the ETL writes there, and the
two token indexes would cost every row ~14 µs of PostgreSQL CPU. Once a day is closed (UTC), its
partition gets `<partition>_device_user_day` and `<partition>_ip_user_day`; so does the default
partition. Two callers:

- `nightly_pass(dsn)`: one pass of `index_closed_days` on a connection of its own, on a current
  schema only, for the nightly job (`python main.py snapshot`, before its refresh, which then reads
  the closed days by index-only scans);
- `TokenIndexer`: the ETL's daemon thread, on its own connection: a pass at start, then one each
  time the UTC day has changed (looked at every CHECK_SECONDS), or until a pass completes.

A pass holds a session advisory lock (TOKEN_INDEX_LOCK_ID and the schema): another process indexing
makes it skip. A build waits for every transaction older than it (an analyst's session left open),
in bounded steps: each lock wait ends after LOCK_STEP_SECONDS, when the sessions it waited for are
logged (pid, application, user, since when) and its INVALID leftover dropped, and the build tried
again, until LOCK_WAIT_SECONDS in all; then the index is left for the next pass, the pass says who
held it. A build runs at most BUILD_TIMEOUT_SECONDS (statement_timeout).
`CREATE INDEX CONCURRENTLY` never blocks writes; killed or cancelled, it leaves an INVALID index,
which the next pass drops (DROP INDEX CONCURRENTLY) and builds again. The caller may cancel a pass
at any time (`connection.cancel()` from another thread): nothing is left half-done but that.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date

import psycopg2
import psycopg2.errors
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor

from database import partitions
from database.connection import first_line, open_connection
from database.errors import DatabaseUnavailable
from database.schema import schema_problem

logger = logging.getLogger(__name__)

# The session advisory lock of a pass: (TOKEN_INDEX_LOCK_ID, hashtext(current_schema())), one per
# schema (advisory locks are per database; a test database holds a schema per test). One process at
# a time builds a schema's token indexes; the others skip instead of waiting. The two-key form lives
# in its own key space, apart from the schema lock's one bigint (schema.SCHEMA_LOCK_ID); its
# first key is not the snapshot refresh's (database/snapshot.py), whose second key, a view's oid,
# could equal a schema's hash.
TOKEN_INDEX_LOCK_ID = 741_235_020
_LOCK_KEY = "%s, hashtext(current_schema())"
# How often the ETL's indexer looks whether the UTC day has changed (or retries a pass that failed).
CHECK_SECONDS = 300.0
# One lock wait of a build (lock_timeout), the waits of one index in all, one build (statement_timeout).
LOCK_STEP_SECONDS = 60.0
LOCK_WAIT_SECONDS = 1800.0
BUILD_TIMEOUT_SECONDS = 3600.0


@dataclass
class IndexPass:
    """What one pass did: skipped (another session held the lock), built, dropped (INVALID leftovers)."""

    skipped: bool = False
    built: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    # index -> the sessions its build waited for, when it gave up (left for the next pass)
    waited: dict[str, str] = field(default_factory=dict)

    def summary(self, seconds: float) -> str:
        """One line for the nightly job's output."""
        if self.skipped:
            return "token indexes: skipped, another session (the ETL's indexer) is building them"
        dropped = f"; dropped {len(self.dropped)} INVALID leftover(s)" if self.dropped else ""
        if self.waited:
            dropped += "; not built, waited too long for older transactions: " + "; ".join(
                f"{name} ({holders})" for name, holders in self.waited.items()
            )
        if not self.built:
            done = "none built" if self.waited else "every closed partition has them"
            return f"token indexes: {done}{dropped}"
        return f"token indexes: built {len(self.built)} in {seconds:.1f} s ({', '.join(self.built)}){dropped}"


def nightly_pass(
    dsn: str,
    *,
    connect_timeout_seconds: int = 5,
    lock_step_seconds: float = LOCK_STEP_SECONDS,
    lock_wait_seconds: float = LOCK_WAIT_SECONDS,
) -> str:
    """One pass for the nightly job, on a connection of its own; return one line saying what it did.

    Skipped (said so) unless the schema is current: a schema 4 keeps its parent indexes until the
    ETL migrates it, and a newer release's may index otherwise. What PostgreSQL refuses (a role
    that does not own the tables) is said, not raised: the snapshot's refresh goes on (the ETL's
    indexer or the next night builds them). Raises DatabaseUnavailable when PostgreSQL is
    unreachable or the connection is lost.
    """
    conn = open_connection(dsn, connect_timeout=connect_timeout_seconds, application_name="login-etl-snapshot")
    conn.autocommit = True  # no transaction left open before CONCURRENTLY
    started = time.monotonic()
    try:
        with conn.cursor() as cur:
            problem = schema_problem(cur)
        if problem is not None:
            return f"token indexes: skipped, the schema is not current ({problem})"
        result = index_closed_days(conn, lock_step_seconds=lock_step_seconds, lock_wait_seconds=lock_wait_seconds)
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        raise DatabaseUnavailable(first_line(exc)) from None
    except psycopg2.Error as exc:  # e.g. not the partitions' owner: the ETL role builds them
        logger.warning("token indexes: the pass failed (%s)", first_line(exc))
        return f"token indexes: not built, refused by PostgreSQL ({exc.pgcode}: {first_line(exc)})"
    finally:
        conn.close()
    return result.summary(time.monotonic() - started)


def index_closed_days(
    connection: Connection,
    today: date | None = None,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    lock_step_seconds: float = LOCK_STEP_SECONDS,
    lock_wait_seconds: float = LOCK_WAIT_SECONDS,
    build_timeout_seconds: float = BUILD_TIMEOUT_SECONDS,
) -> IndexPass:
    """Build the token indexes the closed partitions lack, one CONCURRENTLY at a time; return what was done.

    `connection` must be in autocommit (CONCURRENTLY runs outside a transaction) and is left so.
    A build waits for the transactions older than it (an analyst's long query) in steps of
    `lock_step_seconds` (lock_timeout), naming them in the log at each step, up to
    `lock_wait_seconds` per index; then that index is left (IndexPass.waited) and the pass goes on.
    `should_stop` is looked at between statements; to stop one mid-way, `connection.cancel()`.
    Raises psycopg2 errors (QueryCanceled when cancelled or past `build_timeout_seconds`).
    """
    today = today or partitions.utc_today()
    connection.autocommit = True
    result = IndexPass()
    with connection.cursor() as cur:
        cur.execute(f"SELECT pg_try_advisory_lock({_LOCK_KEY})", (TOKEN_INDEX_LOCK_ID,))
        row = cur.fetchone()
        if row is None or not row[0]:
            logger.info("token indexes: another session is building them; skipped")
            result.skipped = True
            return result
        try:
            step_ms = max(1, int(lock_step_seconds * 1000))
            cur.execute(
                f"SET statement_timeout = {max(1, int(build_timeout_seconds * 1000))}; SET lock_timeout = {step_ms}"
            )
            result.dropped.extend(_drop_invalid(cur, should_stop))
            missing = partitions.missing_token_indexes(cur, today)
            for n, (leaf, name) in enumerate(missing, 1):
                if should_stop():
                    break
                columns = partitions.token_index_names(leaf)[name]
                started = time.monotonic()
                holders = _build(cur, name, f"ON {leaf} {columns}", lock_wait_seconds, should_stop)
                if holders is not None:
                    result.waited[name] = holders
                    continue
                logger.info(
                    "token indexes: built %s in %.1f s (%d of %d)", name, time.monotonic() - started, n, len(missing)
                )
                result.built.append(name)
        finally:
            if not connection.closed:
                try:
                    cur.execute("RESET statement_timeout; RESET lock_timeout")
                    cur.execute(f"SELECT pg_advisory_unlock({_LOCK_KEY})", (TOKEN_INDEX_LOCK_ID,))
                except psycopg2.Error:
                    pass  # the session ends with the connection, and its lock with it
    return result


def _drop_invalid(cur: Cursor, should_stop: Callable[[], bool]) -> list[str]:
    """Drop the INVALID token indexes (a build killed or cancelled mid-way: IF NOT EXISTS would keep
    it as it is); return their names."""
    dropped = []
    for leaf, indexes in partitions.token_index_state(cur).items():
        for name, valid in indexes.items():
            if valid is False and not should_stop():
                cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                logger.info("token indexes: dropped the INVALID leftover %s of %s", name, leaf)
                dropped.append(name)
    return dropped


def _build(
    cur: Cursor, name: str, target: str, lock_wait_seconds: float, should_stop: Callable[[], bool]
) -> str | None:
    """CREATE INDEX CONCURRENTLY, again after each lock timeout until `lock_wait_seconds` have gone;
    None once built, else who it waited for (its INVALID leftover dropped when that can be done)."""
    started = time.monotonic()
    while True:
        attempt = time.monotonic()
        try:
            cur.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} {target}")
            return None
        except psycopg2.errors.LockNotAvailable:
            holders = _older_transactions(cur, time.monotonic() - attempt)
        waited = time.monotonic() - started
        logger.warning("token indexes: %s waited %.0f s so far for %s", name, waited, holders)
        try:  # the cancelled build's INVALID leftover: IF NOT EXISTS would keep it as it is
            cur.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        except psycopg2.errors.LockNotAvailable:
            return holders  # the next pass drops it
        if waited >= lock_wait_seconds or should_stop():
            logger.warning("token indexes: %s left for the next pass after %.0f s; %s", name, waited, holders)
            return holders


def _older_transactions(cur: Cursor, seconds: float) -> str:
    """The sessions of this database whose transaction began before the build did (what it waits
    for): pid, application, user, state and since when; never a query's text."""
    cur.execute(
        """SELECT pid, coalesce(nullif(application_name, ''), '?'), coalesce(usename, '?'), coalesce(state, '?'),
                  to_char(xact_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')
             FROM pg_stat_activity
            WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
              AND xact_start < now() - make_interval(secs => %s)
            ORDER BY xact_start LIMIT 5""",
        (seconds,),
    )
    found = [f"pid {pid} ({app}, user {user}, {state} since {since} UTC)" for pid, app, user, state, since in cur]
    return "held by " + "; ".join(found) if found else "(its holder has gone)"


class TokenIndexer:
    """The ETL's background thread that indexes the closed days, on its own connection.

    Never in the writer's path: it only reads the catalog and runs CONCURRENTLY builds. `stop()`
    does not wait for it: it cancels the statement in flight and returns; the thread is a daemon.
    """

    def __init__(
        self,
        dsn: str,
        *,
        check_seconds: float = CHECK_SECONDS,
        connect_timeout_seconds: int = 5,
        application_name: str = "login-etl-token-indexer",
        today: Callable[[], date] | None = None,
    ) -> None:
        self._dsn = dsn
        self._check_seconds = check_seconds
        self._connect_timeout = connect_timeout_seconds
        self._application_name = application_name
        self._today = today or partitions.utc_today
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return "TokenIndexer()"  # the DSN may hold a password

    def start(self) -> None:
        """Start the thread: a pass now, then one each new UTC day."""
        self._thread = threading.Thread(target=self._loop, name="token-indexer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel the build in flight (its INVALID leftover is dropped next time); do not wait."""
        with self._lock:
            self._stopping.set()
            conn = self._conn
        if conn is not None and not conn.closed:
            try:
                conn.cancel()
            except psycopg2.Error:
                pass

    def _loop(self) -> None:
        done_for: date | None = None
        while not self._stopping.is_set():
            today = self._today()
            if done_for != today and self._pass(today):
                done_for = today
            self._stopping.wait(self._check_seconds)

    def _pass(self, today: date) -> bool:
        """One pass on a connection of its own; True if it completed (nothing left for `today`)."""
        try:
            conn = open_connection(
                self._dsn, connect_timeout=self._connect_timeout, application_name=self._application_name
            )
        except DatabaseUnavailable as exc:
            logger.warning(
                "token indexes: PostgreSQL unreachable (%s); trying again in %.0f s", exc, self._check_seconds
            )
            return False
        with self._lock:
            if self._stopping.is_set():
                conn.close()
                return False
            self._conn = conn
        try:
            result = index_closed_days(conn, today, should_stop=self._stopping.is_set)
            return not result.skipped and not result.waited and not self._stopping.is_set()
        except psycopg2.Error as exc:
            if not self._stopping.is_set():
                logger.warning(
                    "token indexes: a pass failed (%s); trying again in %.0f s", first_line(exc), self._check_seconds
                )
            return False
        finally:
            with self._lock:
                self._conn = None
            conn.close()
