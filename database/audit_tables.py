"""The audit tables a command appends to: found safely, checked append-only for the writer, and
created on first use only where that is safe.

An audit row is worth something only if its writer cannot take it back. So before a command writes
to `pii_unmask_audit`, `etl_replay_audit` or `etl_retention_audit` it checks the table it found:

- not a temporary table (one of the session's own would shadow the real one: a `search_path` or
  `PGOPTIONS` trick), and named schema-qualified from then on;
- owned by the administrator (a superuser, or the schema's owner), not by a role that could later
  change or drop it;
- and, unless this role is the administrator, one it may not UPDATE, DELETE, TRUNCATE or own.

A missing table is created (its DDL file, under an advisory lock) only by the administrator: made by
any other role it would be that role's to change. Otherwise the command stops with one line naming
database/roles.sql, which makes all three (docs/keys-and-privacy.md).
"""

from __future__ import annotations

from psycopg2 import sql
from psycopg2.extensions import cursor as Cursor

from database.errors import DatabaseError

ROLES_SQL = "run database/roles.sql as the administrator (docs/keys-and-privacy.md)"

_LOOK = """
SELECT n.nspname,
       n.oid OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema(),
       EXISTS (SELECT FROM pg_catalog.pg_roles o
                WHERE o.oid OPERATOR(pg_catalog.=) c.relowner
                  AND (o.rolsuper OR o.oid OPERATOR(pg_catalog.=) n.nspowner)),
       pg_catalog.pg_has_role(c.relowner, 'USAGE')
         OR pg_catalog.has_table_privilege(c.oid, 'UPDATE, DELETE, TRUNCATE')
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass(%s)"""

# Whether this role is the administrator here: a superuser, or the owner of the schema it creates in.
_ADMINISTRATOR = """
SELECT r.rolsuper OR EXISTS (SELECT FROM pg_catalog.pg_namespace n
                              WHERE n.nspname OPERATOR(pg_catalog.=) pg_catalog.current_schema()
                                AND n.nspowner OPERATOR(pg_catalog.=) r.oid),
       pg_catalog.current_schema(), CURRENT_USER
  FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER"""


class AuditTableUnsafe(DatabaseError):
    """Raised when an audit table is missing where this role may not create it, or is not append-only for it."""


def audit_table(cur: Cursor, table: str, ddl: str, lock_id: int) -> sql.Identifier:
    """The schema-qualified name of the audit table `table`, created from `ddl` first if missing and
    this role is the administrator; raise AuditTableUnsafe if it may not be written safely."""
    cur.execute(_ADMINISTRATOR)
    administrator, schema, user = cur.fetchone() or (False, None, "?")
    cur.execute(_LOOK, (table,))
    found = cur.fetchone()
    if found is None:
        if not administrator or schema is None:
            raise AuditTableUnsafe(
                f"{table} does not exist, and this role ({user}) may not create it (its creator could change "
                f"its rows): {ROLES_SQL}"
            )
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
        # The DDL names the table unqualified and qualifies its functions: it goes into `schema`.
        cur.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))
        cur.execute(ddl)
        cur.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        cur.execute(_LOOK, (sql.Identifier(schema, table).as_string(cur),))
        found = cur.fetchone()
        if found is None:  # pragma: no cover - the DDL makes it
            raise AuditTableUnsafe(f"{table} was not created: {ROLES_SQL}")
    found_schema, temporary, owned_by_administrator, changeable = found
    if temporary:
        raise AuditTableUnsafe(f"a temporary table {table} hides the audit table; not writing to it: {ROLES_SQL}")
    if not owned_by_administrator:
        raise AuditTableUnsafe(
            f"{found_schema}.{table} is not owned by the administrator: its owner could change its rows; {ROLES_SQL}"
        )
    if changeable and not administrator:
        raise AuditTableUnsafe(
            f"{found_schema}.{table} is not append-only for this role ({user}): it could change or delete "
            f"audit rows; {ROLES_SQL}"
        )
    return sql.Identifier(found_schema, table)
