"""Network tokens in the database (issue 32, schema 7), against the real PostgreSQL: the ETL and the
Lambda write `masked_network` from the next message on; a database of the schema before gets the
column at start; the rows stored before are filled by `backfill-networks` (stopped mid-way and rerun;
`check` counts what is left; legacy ip tokens after `rekey`); `rekey` and `replay` keep it right;
`unmask` of a network token prints the network, audited; the analysts' network queries of
docs/analysts.md answer what the rows say, counted by hand."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from datetime import date, timedelta
from typing import Any

import psycopg2
import pytest

from cli.exit_codes import EXIT_OK
from database.network_backfill import NetworkBackfill
from database.schema import SCHEMA_VERSION
from database.sqs_postgres import PostgresWriter
from helpers import ROOT, login, query, send
from lambda_handler import SqsBatchHandler
from main import main
from models import MaskedLogin, Rejection
from pii.masking import BODY_FIELD, Masker, decode_key, generate_key
from tests.legacy_tokens import legacy_token

TODAY = date.today()
K1, K2 = generate_key(), generate_key()
V1 = Masker(decode_key(K1), version=1)
V2 = Masker(decode_key(K2), version=2)


class _Context:
    """What the handler reads of the Lambda context."""

    aws_request_id = "network-test"

    def get_remaining_time_in_millis(self) -> int:
        return 60_000


def networks(database_url: str) -> dict[str, str | None]:
    return dict(query(database_url, "SELECT user_id, masked_network FROM user_logins"))


def test_the_etl_and_the_lambda_write_a_network_token_beside_each_ip_token(etl_env, sqs_client, masking_key) -> None:
    db = etl_env["DATABASE_URL"]
    masker = Masker(decode_key(masking_key))
    # GIVEN messages from two addresses of one /24, an IPv6 address and a value that is not an IP
    bodies = [
        login(1, ip="203.0.113.7"),
        login(2, ip="::ffff:203.0.113.200"),
        login(3, ip="2001:db8:1:2::9"),
        login(4, ip="unknown"),
    ]
    send(sqs_client, etl_env["SQS_QUEUE_URL"], bodies)
    # WHEN the ETL drains them
    assert main([]) == EXIT_OK
    # THEN each row has the network token of its IP; one /24, one token; none for "unknown"
    stored = networks(db)
    assert stored == {
        "user-1": masker.mask_network("203.0.113.7"),
        "user-2": masker.mask_network("203.0.113.7"),
        "user-3": masker.mask_network("2001:db8:1::1"),
        "user-4": None,
    }
    assert stored["user-1"] == stored["user-2"] != stored["user-3"]
    # AND the Lambda's handler, the same core, writes it too
    handler = SqsBatchHandler(PostgresWriter(db), masker)
    record = {
        "messageId": "lambda-5",
        "receiptHandle": "AQEB-5",
        "body": login(5, ip="203.0.113.99"),
        "attributes": {"ApproximateReceiveCount": "1", "SentTimestamp": str(int(time.time() * 1000))},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
    }
    try:
        assert handler.handle({"Records": [record]}, _Context()) == {"batchItemFailures": []}
    finally:
        handler.writer.close()
    assert networks(db)["user-5"] == stored["user-1"]
    # AND unmask of a network token prints the network, audited like any other unmask
    assert main(["unmask", "--reason", "network test", stored["user-1"], stored["user-3"]]) == EXIT_OK  # type: ignore[list-item]
    assert query(db, "SELECT count(*), max(token_count) FROM pii_unmask_audit WHERE reason = 'network test'") == [
        (1, 2)
    ]


def test_unmask_prints_the_network_and_nothing_of_the_address(etl_env, masking_key, capsys) -> None:
    masker = Masker(decode_key(masking_key))
    token = masker.mask_network("198.51.100.23")
    capsys.readouterr()
    assert main(["unmask", "--reason", "network case", token]) == EXIT_OK  # type: ignore[list-item]
    out = capsys.readouterr().out
    assert out == "198.51.100.0/24\n" and "23" not in out


def _old_schema(database_url: str) -> None:
    """The schema as the release before 7 left it: no masked_network, the view without networks."""
    writer = PostgresWriter(database_url)
    writer.connect()
    writer.close()
    query(
        database_url,
        """DROP MATERIALIZED VIEW user_login_duplicates_snapshot; DROP VIEW user_login_duplicates;
           ALTER TABLE user_logins DROP COLUMN masked_network;
           DELETE FROM etl_schema_version WHERE version >= 6; INSERT INTO etl_schema_version VALUES (5)""",
    )


def _rows_before(database_url: str) -> list[tuple[str, str]]:
    """Rows stored before schema 7 (no network token): (user_id, ip) for IPs, legacy and non-IP values."""
    ips = [(f"u{n}", f"192.0.2.{n % 7}") for n in range(400)] + [
        (f"u6-{n}", f"2001:db8:{n % 3}::{n}") for n in range(9)
    ]
    rows = [
        MaskedLogin(f"m-{user}", user, "ios", V1.mask("ip", ip), V1.mask("device_id", f"d-{user}"), None, "1", TODAY)
        for user, ip in ips
    ]
    rows.append(
        MaskedLogin("m-x", "ux", "ios", V1.mask("ip", "not-an-ip"), V1.mask("device_id", "dev"), None, "1", TODAY)
    )
    rows.append(
        MaskedLogin(
            "m-l",
            "ul",
            "ios",
            legacy_token(decode_key(K1), 1, "ip", "192.0.2.3"),
            V1.mask("device_id", "dev"),
            None,
            "1",
            TODAY,
        )
    )
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            for r in rows:
                cur.execute(
                    "INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, "
                    "app_version, create_date) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (r.message_id, r.user_id, r.device_type, r.masked_ip, r.masked_device_id, r.app_version, TODAY),
                )
    finally:
        conn.close()
    return ips


def test_an_old_schema_gets_the_column_and_a_backfill_stopped_midway_is_finished_by_a_rerun(
    etl_env, monkeypatch, capsys
) -> None:
    db = etl_env["DATABASE_URL"]
    monkeypatch.setenv("MASKING_KEY", K1)
    # GIVEN a database of the schema before 7 holding rows (IPv4, IPv6, a non-IP value, a legacy token)
    _old_schema(db)
    ips = _rows_before(db)
    # WHEN the ETL (any command that migrates) starts
    writer = PostgresWriter(db)
    writer.connect()
    writer.close()
    # THEN the column is there, NULL in the rows before, the schema current and the view lists networks
    assert query(db, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)]
    assert query(db, "SELECT count(*) FROM user_logins WHERE masked_network IS NOT NULL") == [(0,)]
    assert "'network'" in query(db, "SELECT pg_get_viewdef('user_login_duplicates')")[0][0]
    # AND check counts the rows that lack one (the IP addresses of Tink tokens: not the non-IP, not the legacy)
    capsys.readouterr()
    main(["check"])
    assert f"✓ network tokens: {len(ips)} rows stored before schema 7 lack one" in capsys.readouterr().out

    # WHEN a backfill is stopped after 50 rows (batches of one page, ~30 rows, here)
    calls = 0

    def stopping(token: str) -> str | None:
        nonlocal calls
        calls += 1
        if calls > 50:
            raise KeyboardInterrupt
        return V1.network_of_token(token)

    with pytest.raises(KeyboardInterrupt):
        NetworkBackfill(db, stopping, batch_rows=10).run()
    # THEN its committed batches are kept, the batch in hand is not
    filled = query(db, "SELECT count(*) FROM user_logins WHERE masked_network IS NOT NULL")[0][0]
    assert 0 < filled < 50

    # WHEN it is run again, from the CLI
    capsys.readouterr()
    assert main(["backfill-networks", "--batch-size", "7"]) == EXIT_OK
    out = capsys.readouterr().out
    # THEN every IP row has the network token of its address, exactly what the ETL writes today
    assert f"network tokens: {len(ips) - filled} rows filled; 0 rows still lack one" in out
    assert "1 rows hold a legacy v<n>. ip token: run `python main.py rekey`" in out
    stored = networks(db)
    for user, ip in ips:
        assert stored[user] == V1.mask_network(ip), user
    assert stored["ux"] is None  # not an IP: no network, and not counted as lacking
    assert stored["ul"] is None  # a legacy token: rekey first
    capsys.readouterr()
    main(["check"])
    assert "✓ network tokens: every row of an IP address has one" in capsys.readouterr().out

    # WHEN the key is rotated and rekey runs, then the backfill again
    monkeypatch.delenv("MASKING_KEY")
    monkeypatch.setenv("MASKING_KEYS", f"1:{K1},2:{K2}")
    monkeypatch.setenv("MASKING_KEY_VERSION", "2")
    assert main(["rekey", "--batch-size", "9"]) == EXIT_OK
    assert main(["backfill-networks"]) == EXIT_OK
    # THEN every network token is the new key's, the legacy row has its network too
    stored = networks(db)
    for user, ip in [*ips, ("ul", "192.0.2.3")]:
        assert stored[user] == V2.mask_network(ip), user
    assert stored["ux"] is None
    # AND the analysts' duplicates view counts the networks: one /24 (400 rows and the legacy one), three /48s
    rows = dict(query(db, "SELECT masked_value, logins FROM user_login_duplicates WHERE field = 'network'"))
    assert rows == {
        V2.mask_network("192.0.2.1"): 401,
        **{V2.mask_network(f"2001:db8:{n}::1"): 3 for n in range(3)},
    }


def test_replay_loads_a_quarantined_message_with_its_network_token(etl_env, masking_key) -> None:
    db = etl_env["DATABASE_URL"]
    masker = Masker(decode_key(masking_key))
    writer = PostgresWriter(db)
    writer.connect()
    try:
        body = login(8, ip="198.51.100.8")
        writer.write(
            [], [Rejection("m-q", "processing failed 5 times: RuntimeError", masker.mask(BODY_FIELD, body), None, 5)]
        )
    finally:
        writer.close()
    assert main(["replay", "--reason", "network test"]) == EXIT_OK
    assert networks(db) == {"user-8": masker.mask_network("198.51.100.1")}


# -- the analysts' network questions of docs/analysts.md ---------------------------------------------


def documented_network_queries() -> list[str]:
    text = (ROOT / "docs" / "analysts.md").read_text(encoding="utf-8")
    section = text[text.index("## Networks") :]
    start = section.index("```sql") + len("```sql")
    block = section[start : section.index("```", start)]
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("--")]
    return [sql.strip() for sql in "\n".join(lines).split(";") if sql.strip()]


def _analyst_rows() -> list[MaskedLogin]:
    """Logins over 10 days: accounts sharing networks, accounts hopping networks, devices on a network."""
    rows = []
    for n in range(80):
        day = TODAY - timedelta(days=(0, 1, 3, 10)[n % 4])  # the 10th day is outside the week
        ip = f"198.51.{n % 5}.{n % 13}" if n % 6 else f"2001:db8:{n % 2}::{n}"
        rows.append(
            MaskedLogin(
                f"m-{n}",
                f"user-{n % 9}",
                "ios",
                V1.mask("ip", ip),
                V1.mask("device_id", f"dev-{n % 11}"),
                None,
                "1",
                day,
                V1.mask_network(ip),
            )
        )
    return rows


def _by_hand(rows: list[MaskedLogin]) -> list[list[tuple[Any, ...]]]:
    week = [r for r in rows if r.create_date >= TODAY - timedelta(days=7) and r.masked_network]
    per_day: dict[tuple[date, str], list[MaskedLogin]] = defaultdict(list)
    per_user: dict[str, list[MaskedLogin]] = defaultdict(list)
    per_network: dict[str, list[MaskedLogin]] = defaultdict(list)
    for r in week:
        per_day[r.create_date, r.masked_network].append(r)  # type: ignore[index]
        per_user[r.user_id].append(r)
        per_network[r.masked_network].append(r)  # type: ignore[index]
    accounts = [
        (day, net, len({r.user_id for r in g}), len(g))
        for (day, net), g in per_day.items()
        if len({r.user_id for r in g}) > 1
    ]
    hopping = [
        (user, len({r.masked_network for r in g}), len(g))
        for user, g in per_user.items()
        if len({r.masked_network for r in g}) > 1
    ]
    devices = [
        (net, len({r.masked_device_id for r in g}), len({r.user_id for r in g}))
        for net, g in per_network.items()
        if len({r.masked_device_id for r in g}) > 1
    ]
    return [sorted(accounts), sorted(hopping), sorted(devices)]


def test_the_documented_network_queries_answer_what_the_rows_say(database_url) -> None:
    # GIVEN logins of a week and more, written by the ETL's writer
    rows = _analyst_rows()
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        writer.write(rows, [])
    finally:
        writer.close()
    queries = documented_network_queries()
    assert len(queries) == 3
    # WHEN the three documented queries run (each returns fewer than 20 rows: LIMIT cuts nothing)
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET TIME ZONE 'UTC'")  # current_date is the partitions' day
            answers = []
            for sql in queries:
                cur.execute(sql)
                answers.append(sorted(cur.fetchall()))
    finally:
        conn.close()
    # THEN they are the answers counted by hand
    expected = _by_hand(rows)
    assert all(0 < len(rows) < 20 for rows in expected), [len(e) for e in expected]
    assert answers == expected


def test_a_value_that_looks_like_a_network_is_not_an_ip_and_gets_no_network_token(etl_env, sqs_client) -> None:
    # A value that is not an IP address (but looks like a network) gives no token: NULL, not an error.
    send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(1, ip="203.0.113.0/24"), json.dumps({"x": 1})])
    assert main([]) == EXIT_OK
    assert networks(etl_env["DATABASE_URL"]) == {"user-1": None}
