"""One version, one key: the check value of each key version the database has seen (schema 6).

Tokens carry their key version, not the key. Two keys under one version (a second clone's fresh
key 1 pointed at the first one's database) would give one value two tokens and leave half of them
unreadable, silently. So the first process that writes under a version records that version's
check value (`pii.masking.key_check_value`: an HMAC of a constant under a key derived for the
purpose, never the key) in ``etl_key_checks``; every writer (the ETL, the Lambda, rekey, replay)
compares its keyring with the table before it writes anything, and stops (sqs_postgres.KeyMismatch) when a
version it holds is recorded with another value. ``check`` and ``unmask`` read the table.
"""

from __future__ import annotations

from collections.abc import Mapping

from psycopg2.extensions import cursor as Cursor

TABLE = "etl_key_checks"
CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    key_version   bigint      PRIMARY KEY,
    check_value   text        NOT NULL,
    first_seen    timestamptz NOT NULL DEFAULT now(),
    database_user text        NOT NULL DEFAULT session_user
)"""


def recorded(cur: Cursor) -> dict[int, str]:
    """``{version: check value}`` as the database records them; {} before schema 6 (reads only)."""
    cur.execute("SELECT to_regclass(%s)", (TABLE,))
    row = cur.fetchone()
    if row is None or row[0] is None:
        return {}
    cur.execute(f"SELECT key_version, check_value FROM {TABLE}")
    return {int(version): str(value) for version, value in cur.fetchall()}


def mismatched(held: Mapping[int, str], known: Mapping[int, str]) -> list[int]:
    """The versions held whose check value differs from the recorded one, ascending."""
    return sorted(version for version, value in held.items() if version in known and known[version] != value)


def verify(cur: Cursor, held: Mapping[int, str], *, register: bool) -> list[int]:
    """The versions held that are recorded with another key (none: all is well); with `register`,
    first record the versions not yet known (in the caller's transaction: concurrent first writers
    of one version serialise on the primary key, and the second compares with what the first recorded)."""
    cur.execute("SELECT to_regclass(%s)", (TABLE,))
    row = cur.fetchone()
    if row is None or row[0] is None:
        return []  # before schema 6 (a process that reads or rewrites without migrating): nothing to compare
    known = recorded(cur)
    wrong = mismatched(held, known)
    new = sorted((version, value) for version, value in held.items() if version not in known)
    if wrong or not register or not new:
        return wrong  # a keyring that clashes records nothing
    cur.executemany(
        f"INSERT INTO {TABLE} (key_version, check_value) VALUES (%s, %s) ON CONFLICT (key_version) DO NOTHING", new
    )
    return mismatched(held, recorded(cur))


def mismatch_message(versions: list[int]) -> str:
    """One line: which versions clash, that nothing was written, and what to do."""
    listed = ", ".join(map(str, versions))
    several = len(versions) > 1
    return (
        f"key version{'s' if several else ''} {listed}: this database already holds tokens of a different key "
        f"with {'these versions' if several else 'this version'} ({TABLE}); writing would mix two keys under one "
        "version, so nothing was read or written. Use the key this database was written with, give this key "
        "a new version (MASKING_KEYS=N:<key> with MASKING_KEY_VERSION=N), or point DATABASE_URL at a database "
        "of its own"
    )
