"""database/roles.sql: the ETL, analyst, unmasker and auditor roles can do their job and no more."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import psycopg2
import psycopg2.errors

from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE
from database.sqs_postgres import PostgresWriter
from helpers import query
from main import main
from models import MaskedLogin, Rejection
from pii.masking import Masker, decode_key, generate_key
from roles import apply_roles_sql, readme_auditor_query

ROOT = Path(__file__).resolve().parents[2]
KEY = generate_key()
MASKER = Masker(decode_key(KEY))


def refused(dsn: str, sql: str) -> bool:
    """True if PostgreSQL refuses `sql` to this login for lack of privilege."""
    try:
        query(dsn, sql)
    except psycopg2.errors.InsufficientPrivilege:
        return True
    return False


def test_the_least_privilege_set_up_works_as_documented(logins, database_url, monkeypatch, tmp_path) -> None:
    # GIVEN roles.sql run before the ETL's first start, which says to run it again afterwards
    assert "run this file again" in logins["first_run"]
    # WHEN the ETL starts as its role (creating its tables) and writes, and roles.sql runs again
    writer = PostgresWriter(logins["etl"])
    writer.connect()
    writer.write(
        [
            MaskedLogin(
                "m-1",
                "u1",
                "ios",
                MASKER.mask("ip", "10.0.0.1"),
                MASKER.mask("device_id", "d-1"),
                None,
                "1.0",
                date(2024, 1, 1),
            )
        ],
        [],
    )
    writer.close()
    assert "run this file again" not in apply_roles_sql(database_url, logins["roles"])
    # THEN the ETL role can restart (migrations), insert and update, but cannot read the audit
    writer = PostgresWriter(logins["etl"])
    writer.connect()
    writer.close()
    query(logins["etl"], "UPDATE user_logins SET locale = 'en' WHERE message_id = 'm-1'")
    assert refused(logins["etl"], "SELECT * FROM pii_unmask_audit")
    # AND the analyst reads user_logins and the duplicates view, and nothing else, and cannot write
    analyst = logins["analyst"]
    assert query(analyst, "SELECT user_id FROM user_logins") == [("u1",)]
    if query(database_url, "SELECT to_regclass('user_login_duplicates') IS NOT NULL")[0][0]:
        assert query(analyst, "SELECT count(*) FROM user_login_duplicates") == [(0,)]
    for sql in (
        "INSERT INTO user_logins (user_id) VALUES ('x')",
        "UPDATE user_logins SET user_id = 'x'",
        "DELETE FROM user_logins",
        "TRUNCATE user_logins",
        "SELECT * FROM user_logins_rejected",
        "SELECT * FROM pii_unmask_audit",
        "INSERT INTO pii_unmask_audit (requested_by, reason, token_count, "
        "token_fingerprints) VALUES ('a', 'b', 1, '{x}')",
        "CREATE TABLE mine (a int)",
    ):
        assert refused(analyst, sql), sql

    # WHEN an unmasker unmasks (with the key, which no database right gives)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKING_KEY", KEY)
    monkeypatch.setenv("DATABASE_URL", logins["unmask"])
    token = query(analyst, "SELECT masked_ip FROM user_logins")[0][0]
    assert main(["unmask", "--reason", "roles test", "--requested-by", "carol", token]) == EXIT_OK
    # THEN its row is written; it cannot read, change or delete audit rows; the auditor reads them
    assert refused(logins["unmask"], "SELECT * FROM pii_unmask_audit")
    assert refused(logins["unmask"], "UPDATE pii_unmask_audit SET reason = 'nothing to see'")
    assert refused(logins["unmask"], "DELETE FROM pii_unmask_audit")
    assert refused(logins["auditor"], "DELETE FROM pii_unmask_audit")
    assert query(logins["auditor"], "SELECT requested_by, reason, database_user FROM pii_unmask_audit") == [
        ("carol", "roles test", f"{logins['roles']['unmask']}_user")
    ]
    # AND an analyst holding the key still cannot unmask (the audit row cannot be written) nor rekey
    monkeypatch.setenv("DATABASE_URL", analyst)
    assert main(["unmask", "--reason", "not allowed", token]) == EXIT_UNREACHABLE
    assert main(["rekey"]) == EXIT_CONFIG


def test_tables_an_administrator_created_first_are_handed_to_the_etl_role(logins, database_url) -> None:
    # GIVEN the ETL's tables created by the administrator (the ETL was first run as postgres)
    query(database_url, "DROP TABLE IF EXISTS user_logins, user_logins_rejected, etl_schema_version CASCADE")
    admin_writer = PostgresWriter(database_url)
    admin_writer.connect()
    admin_writer.close()
    # WHEN roles.sql runs
    apply_roles_sql(database_url, logins["roles"])
    # THEN the ETL role owns them (its start-up migrations work) and the analyst can read
    writer = PostgresWriter(logins["etl"])
    writer.connect()
    writer.close()
    assert query(logins["analyst"], "SELECT count(*) FROM user_logins") == [(0,)]


def test_replay_runs_as_the_etl_role_its_audit_is_append_only_and_analysts_see_what_it_loaded(
    logins,
    database_url,
    monkeypatch,
    tmp_path,
) -> None:
    # GIVEN a quarantined message, stored by the ETL as its role, and roles.sql run again
    writer = PostgresWriter(logins["etl"])
    writer.connect()
    body = MASKER.mask(
        "rejected_body",
        '{"user_id": "u1", "device_type": "ios", "ip": "10.0.0.9", "device_id": "d-9", "app_version": "1.0"}',
    )
    writer.write([], [Rejection("m-9", "processing failed 5 times: KeyError", body, None, 5)])
    writer.close()
    apply_roles_sql(database_url, logins["roles"])
    # WHEN the ETL role replays it (with the key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKING_KEY", KEY)
    monkeypatch.setenv("DATABASE_URL", logins["etl"])
    assert main(["replay", "--reason", "bug fixed", "--requested-by", "dave"]) == EXIT_OK
    # THEN it is loaded, the audit row names the ETL's login, and the ETL role cannot change the audit
    assert query(logins["analyst"], "SELECT user_id FROM user_logins") == [("u1",)]
    assert query(logins["analyst"], "SELECT message_id, quarantine_reason FROM user_logins_replayed") == [
        ("m-9", "processing failed 5 times: KeyError")
    ]
    assert query(logins["auditor"], "SELECT requested_by, database_user, to_load_ids FROM etl_replay_audit") == [
        ("dave", f"{logins['roles']['etl']}_user", ["m-9"])
    ]
    for sql in (
        "SELECT reason FROM etl_replay_audit",
        "UPDATE etl_replay_audit SET reason = 'x'",
        "DELETE FROM etl_replay_audit",
    ):
        assert refused(logins["etl"], sql), sql
    assert refused(logins["analyst"], "SELECT * FROM etl_replay_audit")


def test_the_unmasker_cannot_forge_who_when_or_from_where_in_an_audit_row(logins, database_url) -> None:
    # GIVEN the unmasker role, which must be able to add audit rows
    unmasker = logins["unmask"]
    forged = {"database_user": "'postgres'", "requested_at": "'2001-01-01'", "client_addr": "'10.6.6.6'", "id": "1"}
    for column, value in forged.items():
        # WHEN it tries to set a column the server must fill THEN it is refused
        override = " OVERRIDING SYSTEM VALUE" if column == "id" else ""
        sql = (
            f"INSERT INTO pii_unmask_audit (requested_by, reason, token_count, token_fingerprints, {column})"
            f"{override} VALUES ('mallory', 'forged', 1, '{{x}}', {value})"
        )
        assert refused(unmasker, sql), column
    # AND even a role that may insert every column (here the table's owner) gets the server's values
    query(
        database_url,
        "INSERT INTO pii_unmask_audit (requested_by, reason, token_count, token_fingerprints, "
        "database_user, requested_at, client_addr) VALUES ('mallory', 'owner', 1, '{x}', 'alice', "
        "'2001-01-01', '10.6.6.6')",
    )
    assert query(
        database_url,
        "SELECT database_user, requested_at > now() - interval '1 minute', "
        "client_addr IS DISTINCT FROM '10.6.6.6' FROM pii_unmask_audit WHERE reason = 'owner'",
    ) == [("postgres", True, True)]


def test_an_auditor_finds_the_rows_behind_an_unmask_with_the_readme_query_as_the_auditor_role(
    logins,
    database_url,
    monkeypatch,
    tmp_path,
) -> None:
    # GIVEN stored logins and a rejected body, the roles set up after the ETL's first start
    writer = PostgresWriter(logins["etl"])
    writer.connect()
    rows = [
        MaskedLogin(
            f"m-{n}",
            f"u{n}",
            "ios",
            MASKER.mask("ip", f"10.0.0.{n}"),
            MASKER.mask("device_id", f"d-{n}"),
            None,
            "1.0",
            date(2024, 1, 1),
            MASKER.mask_network(f"10.{n}.0.1"),
        )
        for n in (1, 2)
    ]
    writer.write(rows, [])
    writer.close()
    apply_roles_sql(database_url, logins["roles"])
    # WHEN an unmasker unmasks the device of u2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKING_KEY", KEY)
    monkeypatch.setenv("DATABASE_URL", logins["unmask"])
    assert main(["unmask", "--reason", "case 7", "--requested-by", "carol", rows[1].masked_device_id]) == EXIT_OK
    # AND the network of u1 (a network token: audited like any other)
    assert main(["unmask", "--reason", "case 8", "--requested-by", "carol", rows[0].masked_network]) == EXIT_OK  # type: ignore[list-item]
    # THEN the auditor, who may not read user_logins, finds both with the README's query
    auditor = logins["auditor"]
    assert refused(auditor, "SELECT * FROM user_logins")
    found = query(auditor, readme_auditor_query())
    assert [(r[1], r[2], r[-4:]) for r in found] == [
        ("carol", "case 7", ("user_logins", "m-2", "u2", "device_id")),
        ("carol", "case 8", ("user_logins", "m-1", "u1", "ip_network")),
    ]
    # AND the view gives the analyst and the unmasker nothing
    assert refused(logins["analyst"], "SELECT * FROM pii_unmask_audit_rows")
    assert refused(logins["unmask"], "SELECT * FROM pii_unmask_audit_rows")
