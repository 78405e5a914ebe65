"""What operators and analysts see: JSON logs, progress, metrics, `check`, the duplicates view."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import date
from pathlib import Path

from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE
from database.sqs_postgres import PostgresWriter
from helpers import login, pii_values, query, queue_counts, send
from main import main
from models import MaskedLogin
from sample_data import generate

ROOT = Path(__file__).resolve().parents[2]


def run_etl(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env or os.environ.copy(),
        timeout=120,
    )


def test_json_logs_are_one_object_per_line_with_fields_and_no_pii(etl_env, sqs_client, tmp_path) -> None:
    bodies = [*generate(300, seed=21), '{"ip": "203.0.113.5", "device_id": "999-88-7777"']
    send(sqs_client, etl_env["SQS_QUEUE_URL"], bodies)

    result = run_etl(tmp_path, "--log-format", "json", "-v", "--progress-seconds", "0.2")

    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records and all({"timestamp", "level", "logger", "message"} <= r.keys() for r in records)
    rejected = [r for r in records if "rejected:" in r["message"]]
    assert rejected and all(r["message_id"] and r["reason"] for r in rejected)
    commits = [r for r in records if r["message"].startswith("committed ")]
    assert commits and all(r["batch_size"] > 0 and r["duration_ms"] >= 0 for r in commits)
    assert any(r["message"].startswith("progress: received") for r in records)
    secrets = {"203.0.113.5", "999-88-7777", etl_env["MASKING_KEY"]} | pii_values(bodies)
    assert len(secrets) > 300  # the sample repeats a quarter of its devices and IPs
    for secret in secrets:
        assert secret not in result.stderr and secret not in result.stdout


def test_the_metrics_endpoint_serves_the_counters_in_follow_mode(etl_env, sqs_client, tmp_path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(40)] + ["not json"])
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--follow", "--metrics-port", str(port), "--wait-seconds", "1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                text = ""
            if "login_etl_messages_loaded_total 40.0" in text:
                break
            time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=20)
    assert "login_etl_messages_loaded_total 40.0" in text, text[-2000:]
    assert "login_etl_messages_received_total 41.0" in text
    assert 'login_etl_messages_rejected_total{reason="not_json"} 1.0' in text
    assert "login_etl_freshness_seconds_count 41.0" in text and "login_etl_oldest_message_age_seconds" in text
    assert "login_etl_batch_seconds_count" in text and "login_etl_batch_size_bucket" in text
    assert "login_etl_last_commit_timestamp_seconds" in text
    assert process.returncode == 0


def test_check_passes_when_everything_is_in_place(etl_env, capsys) -> None:
    PostgresWriter(etl_env["DATABASE_URL"]).connect()
    assert main(["check"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("✓") == 7 and "✗" not in out and "schema: current" in out
    # AND the keys: no version recorded yet (this writer wrote no token)
    assert "✓ keys: the database knows no key version of this keyring yet; the ETL records them" in out
    # AND it says how old the analysts' snapshot is, or that it was never refreshed
    assert "schema: current; analysts' snapshot never refreshed: run `python main.py snapshot`" in out
    # AND yesterday's partition and the default one, which no indexer has indexed yet: said, not failed
    assert "✓ token indexes: 2 closed partition(s) not indexed yet" in out
    writer = PostgresWriter(etl_env["DATABASE_URL"])
    writer.connect()
    today = date.today()
    writer.write([MaskedLogin(f"m-{n}", f"u{n}", "ios", "v1.ip", "v1.dev", None, "1.0", today) for n in (1, 2)], [])
    writer.close()
    assert main(["snapshot"]) == EXIT_OK  # the nightly job: the closed days' token indexes, then the refresh
    capsys.readouterr()
    assert main(["check"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("✓") == 7 and "✗" not in out
    assert re.search(
        r"✓ schema: current; analysts' snapshot refreshed \d{4}-\d\d-\d\d \d\d:\d\d UTC \(0\.0 h ago\)", out
    ), out
    assert "✓ token indexes: every closed partition has them" in out
    assert "✓ network tokens: every row of an IP address has one" in out


def test_check_fails_on_a_missing_key_with_the_fix(etl_env, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MASKING_KEY", "short")
    assert main(["check"]) == EXIT_CONFIG
    assert "✗ configuration: MASKING_KEY is malformed" in capsys.readouterr().out


def test_check_fails_on_a_missing_queue(etl_env, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SQS_QUEUE_URL", etl_env["SQS_QUEUE_URL"] + "-gone")
    PostgresWriter(etl_env["DATABASE_URL"]).connect()
    assert main(["check"]) == EXIT_UNREACHABLE
    out = capsys.readouterr().out
    assert "✗ SQS queue missing or forbidden" in out and "fix: create it" in out


def test_check_fails_on_an_unreachable_sqs(etl_env, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert main(["check"]) == EXIT_UNREACHABLE
    assert "✗ SQS unreachable" in capsys.readouterr().out


def test_check_fails_on_a_missing_dead_letter_queue(etl_env, sqs_client, monkeypatch, capsys) -> None:
    arn = "arn:aws:sqs:us-east-1:000000000000:no-such-dlq-" + os.urandom(4).hex()
    sqs_client.set_queue_attributes(
        QueueUrl=etl_env["SQS_QUEUE_URL"],
        Attributes={"RedrivePolicy": json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "5"})},
    )
    assert main(["check"]) == EXIT_UNREACHABLE
    assert "✗ dead-letter queue" in capsys.readouterr().out


def test_check_fails_on_an_unreachable_database_without_showing_its_password(etl_env, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres:s3cret@127.0.0.1:1/postgres")
    assert main(["check"]) == EXIT_UNREACHABLE
    out = capsys.readouterr().out
    assert "✗ PostgreSQL postgresql://postgres@127.0.0.1:1/postgres unreachable" in out
    assert "s3cret" not in out


def test_check_on_a_fresh_database_says_the_schema_comes_at_first_run_exits_0_and_changes_nothing(
    etl_env,
    capsys,
) -> None:
    assert main(["check"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "schema: not created yet; the ETL creates it at its first run" in out and "✗" not in out
    assert query(etl_env["DATABASE_URL"], "SELECT to_regclass('user_logins')") == [(None,)]


def test_check_on_a_schema_an_older_release_made_says_the_etl_migrates_it_and_exits_0(etl_env, capsys) -> None:
    from database.sqs_postgres import SCHEMA_VERSION

    assert main([]) == EXIT_OK  # an empty queue: the schema is created, nothing else
    db = etl_env["DATABASE_URL"]
    query(db, f"DELETE FROM etl_schema_version WHERE version = {SCHEMA_VERSION}")
    query(db, f"INSERT INTO etl_schema_version (version) VALUES ({SCHEMA_VERSION - 1})")
    capsys.readouterr()
    assert main(["check"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"schema: version {SCHEMA_VERSION - 1}; the ETL migrates it to {SCHEMA_VERSION} at start" in out
    assert "✗" not in out


def test_check_on_a_schema_a_newer_release_made_says_so_and_passes(etl_env, capsys) -> None:
    from database.sqs_postgres import SCHEMA_VERSION

    assert main([]) == EXIT_OK
    query(etl_env["DATABASE_URL"], f"INSERT INTO etl_schema_version (version) VALUES ({SCHEMA_VERSION + 1})")
    capsys.readouterr()
    assert main(["check"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"✓ schema: version {SCHEMA_VERSION + 1}, newer than this release's {SCHEMA_VERSION}; " in out


def test_an_etl_older_than_the_schema_runs_without_migrating_it_back(etl_env, sqs_client, capsys) -> None:
    """A rolling update: new replicas migrated the schema; an old one restarting must leave it alone."""
    from database.sqs_postgres import SCHEMA_VERSION

    assert main([]) == EXIT_OK
    db = etl_env["DATABASE_URL"]
    # GIVEN the next release's schema: a version row and a view with one more column
    definition = query(db, "SELECT pg_get_viewdef('user_login_duplicates')")[0][0].rstrip().rstrip(";")
    query(db, f"CREATE OR REPLACE VIEW user_login_duplicates AS SELECT d.*, 1 AS next_release FROM ({definition}) d")
    query(db, f"INSERT INTO etl_schema_version (version) VALUES ({SCHEMA_VERSION + 1})")
    ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(5)])
    # WHEN this release drains
    assert main([]) == EXIT_OK
    # THEN it stored the messages and left the newer view as it was
    assert query(db, "SELECT count(*) FROM user_logins")[0][0] == len(ids)
    assert (
        query(
            db,
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = 'user_login_duplicates' AND column_name = 'next_release'",
        )[0][0]
        == 1
    )


def test_check_says_where_the_keys_come_from_in_words_not_a_python_repr(etl_env, capsys) -> None:
    assert main(["check"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "masking keys loaded from MASKING_KEY: version 1, new tokens use version 1" in out
    assert "StaticKeys" not in out and "(" not in out.splitlines()[0]


def test_check_exits_2_on_a_key_configuration_error_found_while_loading_the_keys(
    etl_env,
    monkeypatch,
    capsys,
) -> None:
    # One key under two versions is only found once the keys are loaded (as a KMS refusal is).
    key = etl_env["MASKING_KEY"]
    monkeypatch.delenv("MASKING_KEY")
    monkeypatch.setenv("MASKING_KEYS", f"1:{key},2:{key}")
    monkeypatch.setenv("MASKING_KEY_VERSION", "2")
    assert main(["check"]) == EXIT_CONFIG
    out = capsys.readouterr().out
    assert "✗ masking keys: key versions 1 and 2 hold the same key" in out and key not in out


def test_a_busy_metrics_port_exits_2_with_one_line_and_consumes_nothing(etl_env, sqs_client, capsys) -> None:
    send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(1)])
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))  # noqa: S104 - where the metrics server binds
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--metrics-port", str(port)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--metrics-port {port}" in err and "Traceback" not in err
    # Refused before connecting anywhere (the port is served first, for the probes): nothing
    # received, not even the tables created.
    assert queue_counts(sqs_client, etl_env["SQS_QUEUE_URL"]) == (1, 0)
    assert query(etl_env["DATABASE_URL"], "SELECT to_regclass('user_logins')") == [(None,)]


def test_the_duplicates_view_groups_repeated_devices_and_ips(database_url) -> None:
    writer = PostgresWriter(database_url)
    writer.connect()

    def row(n: int, user: str, ip: str, device: str, day: int) -> MaskedLogin:
        return MaskedLogin(f"m{n}", user, "ios", ip, device, None, "1.0", date(2026, 1, day))

    writer.write(
        [
            row(1, "alice", "ip-A", "dev-X", 1),
            row(2, "bob", "ip-A", "dev-X", 3),
            row(3, "alice", "ip-B", "dev-X", 2),
            row(4, "carol", "ip-C", "dev-Y", 5),
            row(5, "carol", "ip-C", "dev-Z", 6),
        ],
        [],
    )
    writer.close()
    assert query(
        database_url,
        "SELECT field, masked_value, logins, users, first_seen, last_seen "
        "FROM user_login_duplicates ORDER BY field, masked_value",
    ) == [
        ("device_id", "dev-X", 3, 2, date(2026, 1, 1), date(2026, 1, 3)),
        ("ip", "ip-A", 2, 2, date(2026, 1, 1), date(2026, 1, 3)),
        ("ip", "ip-C", 2, 1, date(2026, 1, 5), date(2026, 1, 6)),
    ]
