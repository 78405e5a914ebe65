"""How a one-shot command (replay, retention, snapshot) turns psycopg2's errors into ours: one
mapping, `database.sqs_postgres.command_errors`, so each exits with the same code for the same cause."""

from __future__ import annotations

import psycopg2
import psycopg2.errors
import pytest

from database.connection import command_errors
from database.errors import DatabaseError, DatabaseUnavailable


class Busy(DatabaseUnavailable):
    """A command's own lock-timeout error."""


def test_a_lock_timeout_becomes_the_commands_own_error_when_it_has_one() -> None:
    with pytest.raises(Busy, match="waited"), command_errors("retention", lock_timeout=lambda: Busy("waited")):
        raise psycopg2.errors.LockNotAvailable("canceling statement due to lock timeout")


def test_without_one_a_lock_timeout_is_an_unreachable_database_like_any_lost_connection() -> None:
    with pytest.raises(DatabaseUnavailable) as raised, command_errors("replay"):
        raise psycopg2.errors.LockNotAvailable("canceling statement due to lock timeout\nDETAIL: x")
    assert type(raised.value) is DatabaseUnavailable
    assert str(raised.value) == "canceling statement due to lock timeout"
    with pytest.raises(DatabaseUnavailable, match="^server closed the connection$"), command_errors("replay"):
        raise psycopg2.OperationalError("server closed the connection\nunexpectedly")


def test_what_postgresql_refuses_is_a_database_error_naming_the_command() -> None:
    with pytest.raises(DatabaseError) as raised, command_errors("snapshot refresh", lock_timeout=lambda: Busy("no")):
        raise psycopg2.errors.InsufficientPrivilege("must be owner of materialized view\nHINT: x")
    assert not isinstance(raised.value, DatabaseUnavailable)
    assert str(raised.value) == "snapshot refresh refused by PostgreSQL (None: must be owner of materialized view)"


def test_our_own_errors_pass_through_unchanged() -> None:
    own = DatabaseError("user_logins is not partitioned yet")
    with pytest.raises(DatabaseError) as raised, command_errors("retention", lock_timeout=lambda: Busy("no")):
        raise own
    assert raised.value is own
