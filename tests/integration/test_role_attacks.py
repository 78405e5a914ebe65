"""Attacks by a holder of one of our own roles (database/roles.sql), on the real PostgreSQL.

Each test is an attack from issue 26 or one like it: a login in the ETL, analyst, unmasker or
auditor role tries to run code with more rights than its own, or to change or hide an audit row.
The roles are per test (uuid-suffixed, the `logins` fixture) and dropped after it; an attack that
worked would leave its login a superuser until then, which each test checks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date

import psycopg2
import psycopg2.errors
import pytest

from cli.exit_codes import EXIT_CONFIG, EXIT_OK
from database.audit import AUDIT_DDL, token_fingerprint
from database.replay import REPLAY_AUDIT_DDL
from database.sqs_postgres import PostgresWriter
from helpers import ROOT, query
from main import main
from models import MaskedLogin
from pii.masking import Masker, decode_key, generate_key
from roles import apply_roles_sql

KEY = generate_key()
MASKER = Masker(decode_key(KEY))
AUDIT_TABLES = ("pii_unmask_audit", "etl_replay_audit", "etl_retention_audit")


def user_of(logins: dict, group: str) -> str:
    return f"{logins['roles'][group]}_user"


def is_superuser(admin: str, role: str) -> bool:
    return bool(query(admin, "SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,))[0][0])


def attempt(dsn: str, sql: str) -> Exception | None:
    """Run `sql` in one transaction; what PostgreSQL raised, if anything."""
    try:
        query(dsn, sql)
    except psycopg2.Error as exc:
        return exc
    return None


def attempt_each(dsn: str, statements: list[str]) -> None:
    """Run each statement in one session, each committed on its own, whatever the others do."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for sql in statements:
                try:
                    cur.execute(sql)
                except psycopg2.Error:
                    pass
    finally:
        conn.close()


def make_superuser_sql(role: str) -> str:
    """Statements that make `role` a superuser when they run with a superuser's rights (else nothing)."""
    return f"BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; EXCEPTION WHEN insufficient_privilege THEN NULL; END;"


def store_one_login(logins: dict, n: int = 1) -> MaskedLogin:
    row = MaskedLogin(
        f"m-{n}",
        f"u{n}",
        "ios",
        MASKER.mask("ip", f"10.0.0.{n}"),
        MASKER.mask("device_id", f"d-{n}"),
        None,
        "1.0",
        date(2024, 1, 1),
    )
    writer = PostgresWriter(logins["etl"])
    writer.connect()
    writer.write([row], [])
    writer.close()
    return row


@pytest.fixture
def set_up(logins, database_url):
    """roles.sql, the ETL's first start as its role, roles.sql again (as the docs say)."""
    row = store_one_login(logins)
    apply_roles_sql(database_url, logins["roles"])
    return row


def test_an_auditor_cannot_become_superuser_through_temp_objects_seen_by_the_definer_function(
    logins, database_url, set_up
) -> None:
    # GIVEN an auditor's session with a temporary function and temporary views shadowing the ETL's tables
    auditor = user_of(logins, "auditor")
    for table in ("user_logins_rejected", "user_logins", "user_logins_legacy"):
        attack = [
            f"""CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE plpgsql AS $$ BEGIN {make_superuser_sql(auditor)}
                RETURN 'x'; END $$""",
            f"""CREATE TEMP VIEW {table} AS
                SELECT pg_temp.f() AS encrypted_body, pg_temp.f() AS masked_ip, pg_temp.f() AS masked_device_id,
                       'x'::text AS message_id, 'u'::text AS user_id""",
            "SELECT * FROM pii_unmask_fingerprint_rows(ARRAY['a'])",
            "SELECT * FROM pii_unmask_audit_rows",
        ]
        # WHEN it calls the definer function and the view behind it
        attempt_each(logins["auditor"], attack)
        # THEN it is no superuser
        assert not is_superuser(database_url, auditor), table


def test_an_auditor_cannot_run_code_through_operators_or_functions_of_its_temp_schema(
    logins, database_url, set_up
) -> None:
    auditor = user_of(logins, "auditor")
    schema = query(database_url, "SELECT current_schema()")[0][0]
    attack = [
        f"""CREATE FUNCTION pg_temp.eq(text, text) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN
            {make_superuser_sql(auditor)} RETURN $1 OPERATOR(pg_catalog.=) $2; END $$""",
        "CREATE OPERATOR pg_temp.= (LEFTARG = text, RIGHTARG = text, FUNCTION = pg_temp.eq)",
        f"""CREATE FUNCTION pg_temp.unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN
            {make_superuser_sql(auditor)} RETURN QUERY SELECT pg_catalog.unnest($1); END $$""",
        f"SET search_path = pg_temp, {schema}, pg_catalog",
        "SELECT * FROM pii_unmask_fingerprint_rows(ARRAY['a'])",
        "SELECT * FROM pii_unmask_audit_rows",
    ]
    attempt_each(logins["auditor"], attack)
    assert not is_superuser(database_url, auditor)


def test_the_etl_role_cannot_become_superuser_when_the_administrator_reruns_roles_sql(
    logins, database_url, set_up
) -> None:
    # GIVEN functions and operators of the ETL role in its schema that match the calls roles.sql
    # and its objects make more exactly than pg_catalog's own
    etl = user_of(logins, "etl")
    body = make_superuser_sql(etl)
    query(
        logins["etl"],
        f"""
        CREATE FUNCTION unnest(text[]) RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN {body}
            RETURN QUERY SELECT pg_catalog.unnest($1); END $$;
        CREATE FUNCTION format(text, text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN {body}
            RETURN pg_catalog.format($1, $2); END $$;
        CREATE FUNCTION to_regclass(text) RETURNS regclass LANGUAGE plpgsql AS $$ BEGIN {body}
            RETURN pg_catalog.to_regclass($1); END $$;
        CREATE FUNCTION texteq_etl(text, name) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN {body}
            RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
        CREATE OPERATOR = (LEFTARG = text, RIGHTARG = name, FUNCTION = texteq_etl);
        CREATE FUNCTION cardinality(text[]) RETURNS integer LANGUAGE plpgsql AS $$ BEGIN {body}
            RETURN pg_catalog.cardinality($1); END $$;
        """,
    )
    # WHEN the administrator runs roles.sql again (as the docs ask after every upgrade) and an
    # auditor and an unmasker use what it made
    apply_roles_sql(database_url, logins["roles"])
    attempt(logins["auditor"], "SELECT * FROM pii_unmask_audit_rows")
    # THEN the ETL role is no superuser, and nothing roles.sql made depends on the ETL's objects
    assert not is_superuser(database_url, etl)
    dependants = query(
        database_url,
        """SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
             FROM pg_depend d JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid
            WHERE pg_get_userbyid(p.proowner) = %s AND d.deptype = 'n'
              AND d.classid IN ('pg_rewrite'::regclass, 'pg_proc'::regclass, 'pg_constraint'::regclass,
                                'pg_attrdef'::regclass, 'pg_trigger'::regclass)""",
        (etl,),
    )
    assert [d for d in dependants if "etl" not in d[0]] == []


@pytest.mark.parametrize("table", AUDIT_TABLES)
def test_no_audit_table_can_be_erased_or_unguarded_by_the_role_that_writes_it(
    logins, database_url, set_up, table
) -> None:
    # GIVEN roles.sql run before and after the ETL's first start (set_up): every audit table exists
    assert query(database_url, "SELECT to_regclass(%s) IS NOT NULL", (table,)) == [(True,)]
    # THEN no role of ours may change, delete, truncate or unguard its rows, and the administrator owns it
    admin = query(database_url, "SELECT current_user")[0][0]
    assert query(database_url, "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass", (table,)) == [
        (admin,)
    ]
    for group in ("etl", "analyst", "unmask", "auditor"):
        for sql in (
            f"DELETE FROM {table}",
            f"UPDATE {table} SET requested_by = 'x'",
            f"TRUNCATE {table}",
            f"ALTER TABLE {table} DISABLE TRIGGER ALL",
            f"DROP TABLE {table}",
        ):
            assert isinstance(attempt(logins[group], sql), psycopg2.errors.InsufficientPrivilege), (group, sql)


def test_an_audit_table_the_etl_role_made_is_the_administrators_after_roles_sql_with_its_rows_and_no_etl_code(
    logins, database_url
) -> None:
    # GIVEN audit tables the ETL role made itself (no roles.sql run yet where it ran), holding rows,
    # and with the ETL's own trigger, check and default on them
    query(
        database_url,
        f"DROP TABLE IF EXISTS {', '.join(AUDIT_TABLES)} CASCADE; DROP FUNCTION IF EXISTS "
        "pii_unmask_audit_server_columns(), etl_replay_audit_server_columns() CASCADE",
    )
    store_one_login(logins)  # the ETL's start
    etl = user_of(logins, "etl")
    body = make_superuser_sql(etl)
    query(logins["etl"], AUDIT_DDL + ";" + REPLAY_AUDIT_DDL)
    query(
        logins["etl"],
        f"""
        CREATE TABLE IF NOT EXISTS etl_retention_audit (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            run_at timestamptz NOT NULL DEFAULT now(), database_user text NOT NULL DEFAULT session_user,
            requested_by text NOT NULL, keep_days integer NOT NULL, cutoff date NOT NULL,
            action text NOT NULL, object text NOT NULL, rows bigint NOT NULL);
        INSERT INTO etl_retention_audit (requested_by, keep_days, cutoff, action, object, rows)
             VALUES ('ops', 30, '2024-01-01', 'drop partition', 'user_logins_p20231201', 5);
        INSERT INTO pii_unmask_audit (requested_by, reason, token_count, token_fingerprints)
             VALUES ('carol', 'case 1', 1, '{{abc}}');
        CREATE FUNCTION etl_code(text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN {body}
            RETURN $1; END $$;
        ALTER TABLE pii_unmask_audit ADD CHECK (etl_code(reason) IS NOT NULL);
        ALTER TABLE etl_retention_audit ALTER COLUMN object SET DEFAULT etl_code('x');
        CREATE FUNCTION etl_trigger() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} RETURN NEW; END $$;
        CREATE TRIGGER etl_trigger BEFORE INSERT ON etl_replay_audit FOR EACH ROW EXECUTE FUNCTION etl_trigger();
        """,
    )
    # WHEN the administrator runs roles.sql
    apply_roles_sql(database_url, logins["roles"])
    # THEN the administrator owns each table, the rows are kept (who and when as they were), and
    # the ETL's code is gone from them: an insert by the administrator runs none of it
    admin = query(database_url, "SELECT current_user")[0][0]
    for table in AUDIT_TABLES:
        assert query(
            database_url, "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = %s::regclass", (table,)
        ) == [(admin,)], table
        assert isinstance(attempt(logins["etl"], f"DELETE FROM {table}"), psycopg2.errors.InsufficientPrivilege)
    assert query(database_url, "SELECT requested_by, database_user FROM etl_retention_audit") == [("ops", etl)]
    assert query(database_url, "SELECT requested_by, database_user FROM pii_unmask_audit") == [("carol", etl)]
    query(
        database_url,
        """INSERT INTO pii_unmask_audit (requested_by, reason, token_count, token_fingerprints)
                VALUES ('admin', 'x', 1, '{x}');
           INSERT INTO etl_retention_audit (requested_by, keep_days, cutoff, action, object, rows)
                VALUES ('admin', 30, '2024-01-01', 'delete rows', 'user_logins_default', 1);
           INSERT INTO etl_replay_audit (requested_by, reason, dry_run, examined_count, to_load_count,
                       still_failing_count, undecryptable_count, message_ids, to_load_ids)
                VALUES ('admin', 'x', true, 0, 0, 0, 0, '{}', '{}')""",
    )
    assert not is_superuser(database_url, etl)
    # AND a new insert gets a new id past the kept ones
    assert query(database_url, "SELECT count(DISTINCT id) FROM pii_unmask_audit") == [(2,)]


def test_an_unmask_of_another_spelling_of_a_token_is_refused_and_the_view_lists_unmatched_entries(
    logins, database_url, set_up, monkeypatch, tmp_path, capsys
) -> None:
    # GIVEN a stored ip token and another base64 spelling of it (the unused low bits of its last
    # character set), which decrypts to the same value
    token = set_up.masked_ip
    assert token.endswith("==")  # 37 bytes: the last character before "==" has 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = token[:-3] + alphabet[alphabet.index(token[-3]) ^ 1] + "=="
    assert other != token and MASKER.unmask(other) == MASKER.unmask(token)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKING_KEY", KEY)
    monkeypatch.setenv("DATABASE_URL", logins["unmask"])
    # WHEN an unmasker unmasks that spelling
    code = main(["unmask", "--reason", "hide it", "--requested-by", "mallory", other])
    # THEN it is refused with one line, nothing printed, nothing revealed
    captured = capsys.readouterr()
    assert code == EXIT_CONFIG
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "canonical" in captured.err
    # AND an audit entry whose fingerprint matches no stored row (written by hand here, as another
    # client could) still shows in the auditors' view
    query(
        logins["unmask"],
        "INSERT INTO pii_unmask_audit (requested_by, reason, token_count, token_fingerprints) "
        "VALUES ('mallory', 'elsewhere', 1, %s)",
        ([token_fingerprint(other)],),
    )
    assert main(["unmask", "--reason", "case 8", "--requested-by", "carol", token]) == EXIT_OK
    rows = query(logins["auditor"], "SELECT requested_by, message_id FROM pii_unmask_audit_rows ORDER BY audit_id")
    assert rows == [("mallory", None), ("carol", "m-1")]


def test_no_role_of_ours_can_set_role_to_another_or_to_the_definer(logins, database_url, set_up) -> None:
    definer = logins["roles"]["definer"]
    # GIVEN a mistaken grant of the definer role to an auditor, which roles.sql undoes
    query(database_url, f"GRANT {definer} TO {user_of(logins, 'auditor')}")
    apply_roles_sql(database_url, logins["roles"])
    assert query(database_url, "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (definer,)) == [(False,)]
    for group in ("etl", "analyst", "unmask", "auditor"):
        for target in [*logins["roles"].values(), "postgres"]:
            if target == logins["roles"][group]:
                continue
            assert isinstance(attempt(logins[group], f"SET ROLE {target}"), psycopg2.errors.InsufficientPrivilege), (
                group,
                target,
            )


def test_roles_sql_runs_again_and_again_whatever_the_etl_made_in_its_schema(logins, database_url, set_up) -> None:
    # GIVEN objects of the ETL role named as roles.sql's own, made before it ran again
    query(database_url, "DROP VIEW pii_unmask_audit_rows; DROP FUNCTION pii_unmask_fingerprint_rows(text[])")
    query(
        logins["etl"],
        """CREATE VIEW pii_unmask_audit_rows AS SELECT 1 AS x;
           CREATE FUNCTION pii_unmask_fingerprint_rows(text[]) RETURNS SETOF text LANGUAGE sql AS 'SELECT 1::text'""",
    )
    # WHEN roles.sql runs (twice) THEN it replaces them with its own, owned by the administrator and
    # the definer role
    apply_roles_sql(database_url, logins["roles"])
    apply_roles_sql(database_url, logins["roles"])
    admin = query(database_url, "SELECT current_user")[0][0]
    assert query(
        database_url,
        "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'pii_unmask_audit_rows'::regclass",
    ) == [(admin,)]
    assert query(
        database_url,
        "SELECT pg_get_userbyid(proowner), prosecdef, proconfig FROM pg_proc "
        "WHERE oid = 'pii_unmask_fingerprint_rows(text[])'::regprocedure",
    ) == [(logins["roles"]["definer"], True, ["search_path=pg_catalog, pg_temp", "row_security=off"])]


def test_a_command_whose_audit_table_is_missing_where_its_role_may_not_make_it_stops_naming_roles_sql(
    logins, database_url, set_up, monkeypatch, tmp_path, capsys
) -> None:
    # GIVEN the retention audit missing (roles.sql makes it; the ETL role must not: it could erase it)
    query(database_url, "DROP TABLE etl_retention_audit")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", logins["etl"])
    # WHEN the ETL role runs retention
    code = main(["retention", "--keep-days", "30", "--requested-by", "ops"])
    # THEN exit 2 with one line naming roles.sql, and no audit table made by the ETL role
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert err.count("\n") == 1 and "database/roles.sql" in err
    assert query(database_url, "SELECT to_regclass('etl_retention_audit')") == [(None,)]


def test_an_unmask_connection_pointed_at_another_audit_table_writes_nothing_and_shows_nothing(
    logins, database_url, set_up, monkeypatch, tmp_path, capsys
) -> None:
    # GIVEN a second schema where the ETL role may create (a sloppy set-up), holding an audit table
    # of the ETL's own that the unmasker may insert into, and the unmasker's connection options
    # (PGOPTIONS, or the DSN's options) pointing its search_path there
    other = f"{query(database_url, 'SELECT current_schema()')[0][0]}_x"
    query(database_url, f"CREATE SCHEMA {other}; GRANT ALL ON SCHEMA {other} TO {logins['roles']['etl']}")
    try:
        query(
            logins["etl"],
            f"SET search_path = {other}; {AUDIT_DDL}; GRANT INSERT ON pii_unmask_audit TO {logins['roles']['unmask']}",
        )
        query(database_url, f"GRANT USAGE ON SCHEMA {other} TO {logins['roles']['unmask']}")
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MASKING_KEY", KEY)
        unmasker = logins["unmask"].split("?")[0] + f"?options=-csearch_path%3D{other}"
        monkeypatch.setenv("DATABASE_URL", unmasker)
        # WHEN it unmasks a stored token
        code = main(["unmask", "--reason", "elsewhere", "--requested-by", "mallory", set_up.masked_ip])
        # THEN it is refused (an audit table its owner could empty), nothing shown, nothing written there
        captured = capsys.readouterr()
        assert code == EXIT_CONFIG
        assert captured.out == "" and "database/roles.sql" in captured.err
        assert query(database_url, f"SELECT count(*) FROM {other}.pii_unmask_audit") == [(0,)]
    finally:
        query(database_url, f"DROP SCHEMA {other} CASCADE")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_text_a_user_types_cannot_forge_a_log_line(db_env, masking_key, tmp_path, log_format) -> None:
    # GIVEN a --requested-by and a --reason holding line breaks and a forged log line
    token = Masker(decode_key(masking_key)).mask("ip", "10.0.0.1")
    forged = "mallory\nERROR forged line\r\u2028ERROR forged too\x1b[2J"
    # WHEN unmask runs as a process with the text or JSON log
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--log-format", log_format, "unmask"]
        + ["--requested-by", forged, "--reason", forged, token],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MASKING_KEY": masking_key, "DATABASE_URL": db_env},
        cwd=tmp_path,
    )
    # THEN it worked, and no line of its output starts with the forged text
    assert result.returncode == EXIT_OK, result.stderr
    assert "mallory" in result.stderr  # the line that names who asked is there
    for line in (result.stdout + result.stderr).splitlines():
        assert not line.startswith("ERROR forged"), line
        assert "\x1b" not in line
