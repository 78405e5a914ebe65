"""Connections to PostgreSQL, for every session of this package: the TCP settings that keep a call
from hanging on a half-open connection, one transaction run with psycopg2's errors mapped to this
package's, and the small helpers every command shares."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
from psycopg2.extensions import connection as Connection
from psycopg2.extensions import cursor as Cursor
from psycopg2.extensions import make_dsn, parse_dsn

from database.errors import DatabaseError, DatabaseUnavailable

T = TypeVar("T")

# Errors caused by particular rows: those rows are quarantined, the rest of the batch is written.
ROW_ERRORS = (psycopg2.DataError, psycopg2.IntegrityError)

# libpq's TCP settings for every connection, each unless DATABASE_URL sets it (a libpq keyword:
# `?tcp_user_timeout=20000&keepalives_idle=30`). Without them a call over a half-open connection (a
# black-holed server, a NAT or firewall that forgot the connection, a failover) waits for the
# kernel's retransmissions, ~15 minutes (tcp_retries2), or for ever on an idle wait. With them it
# fails within ~8 s (DatabaseUnavailable) and is retried on a new connection.
# tcp_user_timeout: data unacknowledged (or keepalive probes unanswered) this long ends the
# connection; 8 s keeps a stop (--stop-timeout 20 s) plus one hung call inside the 30 s grace of
# Compose and Kubernetes. It can also end a COPY the server stopped reading for that long (a lock
# waited for mid-COPY): the batch is then retried. libpq 12 or later (older ones refuse the keyword).
TCP_USER_TIMEOUT_MS = 8_000
# A connection waiting for an answer with nothing unacknowledged is probed after 5 s of silence,
# every second: a vanished server is noticed within ~8 s, without tcp_user_timeout too (5 + 3 x 1).
TCP_KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "1", "keepalives_count": "3"}


def transaction(conn: Connection, work: Callable[[Cursor], T], *, commit: bool = True) -> T:
    """Run `work(cursor)` in one transaction on `conn`, committed (or, `commit=False`, rolled back).

    A lock waited for past lock_timeout (LockNotAvailable) and a row PostgreSQL refuses (ROW_ERRORS)
    come out as psycopg2 raised them, rolled back, the connection usable. A connection failure
    closes it and becomes DatabaseUnavailable, as does any other error of PostgreSQL's (a dropped
    table, a permission, a server error: not the rows' fault; the caller reconnects, which re-runs
    the migrations, and retries).
    """
    try:
        with conn.cursor() as cur:
            result = work(cur)
        if commit:
            conn.commit()
        else:
            conn.rollback()
        return result
    except psycopg2.errors.LockNotAvailable:
        conn.rollback()  # lock_timeout: the connection is fine, the caller says what waited
        raise
    except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
        close_quietly(conn)
        raise DatabaseUnavailable(first_line(exc)) from None
    except ROW_ERRORS:
        try:
            conn.rollback()
        except psycopg2.Error:
            close_quietly(conn)
        raise
    except psycopg2.Error as exc:
        close_quietly(conn)
        raise DatabaseUnavailable(f"{exc.pgcode or type(exc).__name__}: {first_line(exc)}") from None


def close_quietly(conn: Connection) -> None:
    """Close `conn`; never raises (a connection already broken has nothing left to close)."""
    try:
        conn.close()
    except psycopg2.Error:
        pass


def open_connection(
    dsn: str, *, connect_timeout: int, application_name: str, statement_timeout_seconds: float | None = None
) -> Connection:
    """The one way this package connects: every session (the ETL's, rekey's, replay's, retention's,
    the unmask audit's) gets the TCP settings of connection_parameters(), so that none of them waits
    ~15 minutes on a half-open connection. Raises DatabaseUnavailable."""
    extra = connection_parameters(dsn, statement_timeout_seconds=statement_timeout_seconds)
    try:
        return psycopg2.connect(
            make_dsn(dsn, **extra), connect_timeout=connect_timeout, application_name=application_name
        )
    except psycopg2.OperationalError as exc:
        raise DatabaseUnavailable(first_line(exc)) from None


@contextmanager
def command_errors(command: str, *, lock_timeout: Callable[[], DatabaseError] | None = None) -> Iterator[None]:
    """psycopg2's errors inside a one-shot command (replay, retention, snapshot) as this package's:
    a lock waited for past lock_timeout -> `lock_timeout()` when given; a lost connection ->
    DatabaseUnavailable; anything else PostgreSQL refused (a right missing, the schema behind) ->
    DatabaseError naming `command`. Our own errors pass through."""
    try:
        yield
    except psycopg2.Error as exc:
        if lock_timeout is not None and isinstance(exc, psycopg2.errors.LockNotAvailable):
            raise lock_timeout() from None
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
            raise DatabaseUnavailable(first_line(exc)) from None
        raise DatabaseError(f"{command} refused by PostgreSQL ({exc.pgcode}: {first_line(exc)})") from None


def connection_parameters(dsn: str, *, statement_timeout_seconds: float | None = None) -> dict[str, str]:
    """What psycopg2.connect gets beside `dsn`: the TCP keepalives and tcp_user_timeout the DSN does
    not set, and a statement_timeout added to the DSN's `options` unless they already set one.

    Never a value the DSN gives (an explicit keyword would override it).
    """
    try:
        given = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return {}  # psycopg2.connect says what is wrong with it
    defaults = dict(TCP_KEEPALIVES)
    if psycopg2.__libpq_version__ >= 120000:
        defaults["tcp_user_timeout"] = str(TCP_USER_TIMEOUT_MS)
    extra = {name: value for name, value in defaults.items() if name not in given}
    options = given.get("options", "")
    if statement_timeout_seconds is not None and "statement_timeout" not in options:
        milliseconds = max(1, int(statement_timeout_seconds * 1000))
        extra["options"] = f"{options} -c statement_timeout={milliseconds}".strip()
    return extra


def one_row(cur: Cursor) -> tuple[Any, ...]:
    """The row of a query that always returns exactly one."""
    row = cur.fetchone()
    assert row is not None, "the query returns one row"
    return row


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (psycopg2's carry a DETAIL and a CONTEXT after it)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
