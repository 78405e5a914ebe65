"""`python main.py replay`: quarantined messages that now pass are loaded once, audited first, and
nothing of a body reaches the output, the logs or the audit. Real PostgreSQL and SQS."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg2

from cli.exit_codes import EXIT_CONFIG, EXIT_OK, EXIT_UNREACHABLE
from database.copy_format import copy_text
from database.replay import Replayer, ReplayRequest, ReplayResult
from database.schema import COLUMN_LIST, SCHEMA_VERSION
from database.sqs_postgres import PostgresWriter
from etl.transform import retry_quarantined
from helpers import login, query, send
from main import main
from models import MaskedLogin, Rejection
from pii.masking import BODY_FIELD, Masker, decode_key

ROOT = Path(__file__).resolve().parents[2]


def masker_of(env: dict[str, str]) -> Masker:
    return Masker(decode_key(env["MASKING_KEY"]))


def quarantine(env: dict[str, str], rows: list[tuple[str, str, str]]) -> None:
    """Store quarantine rows (message id, reason, body) as the ETL would."""
    masker = masker_of(env)
    writer = PostgresWriter(env["DATABASE_URL"])
    writer.connect()
    sent = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    writer.write(
        [], [Rejection(message_id, reason, masker.mask(BODY_FIELD, body), sent, 1) for message_id, reason, body in rows]
    )
    writer.close()


def quarantined(database_url: str) -> dict[str, tuple[str, bool]]:
    """message id -> (reason, replayed)."""
    rows = query(database_url, "SELECT message_id, reason, replayed_at IS NOT NULL FROM user_logins_rejected")
    return {message_id: (reason, replayed) for message_id, reason, replayed in rows}


def loaded(database_url: str) -> list[str]:
    return [row[0] for row in query(database_url, "SELECT message_id FROM user_logins ORDER BY message_id")]


def audits(database_url: str) -> list[tuple]:
    return query(
        database_url,
        """SELECT requested_by, reason, dry_run, examined_count, to_load_count,
                                         still_failing_count, message_ids, to_load_ids, database_user
                                    FROM etl_replay_audit ORDER BY id""",
    )


def test_a_poison_loop_quarantine_is_replayed_once_its_cause_is_gone(etl_env, sqs_client, monkeypatch, capsys):
    from etl import batch as etl_batch  # prepare() calls transform() there,
    from etl import transform as etl_transform  # and replay's retry_quarantined() there

    ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(5)] + [login(99, user_id="poison")])
    real = etl_batch.transform

    def flaky(message, masker):  # a bug that trips on one good message
        if '"poison"' in message.body:
            raise RuntimeError("boom")
        return real(message, masker)

    monkeypatch.setattr(etl_batch, "transform", flaky)
    monkeypatch.setattr(etl_transform, "transform", flaky)
    assert main(["--max-receives", "1", "--wait-seconds", "1"]) == EXIT_OK
    db = etl_env["DATABASE_URL"]
    assert quarantined(db) == {ids[-1]: ("processing failed 1 times: RuntimeError", False)}

    # The bug is still there: the message stays, with today's reason.
    assert main(["replay", "--reason", "try before the fix", "--requested-by", "bob"]) == EXIT_OK
    assert quarantined(db) == {ids[-1]: ("processing failed on replay: RuntimeError", False)}
    assert len(loaded(db)) == 5

    monkeypatch.setattr(etl_batch, "transform", real)  # the fix is deployed
    monkeypatch.setattr(etl_transform, "transform", real)
    capsys.readouterr()
    assert main(["replay", "--reason", "INC-42 fixed", "--requested-by", "alice"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "loaded into user_logins: 1 (already there: 0)" in out
    assert sorted(loaded(db)) == sorted(ids)
    assert quarantined(db)[ids[-1]] == ("processing failed on replay: RuntimeError", True)
    [first, second] = audits(db)
    assert first[:8] == ("bob", "try before the fix", False, 1, 0, 1, [ids[-1]], [])
    assert second[:8] == ("alice", "INC-42 fixed", False, 1, 1, 0, [ids[-1]], [ids[-1]])
    assert second[8] == query(db, "SELECT session_user")[0][0]  # from the server
    # Analysts (who cannot read the quarantine) see which rows a replay loaded, and under which audit.
    assert query(
        db,
        "SELECT r.message_id, r.replay_audit_id = a.id FROM user_logins_replayed r "
        "JOIN etl_replay_audit a ON a.reason = 'INC-42 fixed'",
    ) == [(ids[-1], True)]


def test_replaying_twice_stores_once_and_a_dry_run_changes_nothing(etl_env, capsys) -> None:
    db = etl_env["DATABASE_URL"]
    quarantine(
        etl_env,
        [
            ("fixed-1", "processing failed 5 times: KeyError", login(1)),
            ("fixed-2", "processing failed 5 times: KeyError", login(2)),
            ("bad-1", "an older wording", login(3, ip=None)),
            ("bad-2", "body is not valid JSON (at character 0)", "not json"),
        ],
    )

    assert main(["replay", "--reason", "look first", "--dry-run"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "dry run: 4 quarantined messages examined, nothing changed" in out
    assert "would load into user_logins: 2" in out and "would stay quarantined: 2" in out
    assert "1  missing required field 'ip'" in out and "1  body is not valid JSON (at character 0)" in out
    assert loaded(db) == [] and quarantined(db)["bad-1"] == ("an older wording", False)
    assert audits(db)[0][2:6] == (True, 4, 2, 2)  # a dry run decrypts too: audited

    assert main(["replay", "--reason", "load them"]) == EXIT_OK
    assert main(["replay", "--reason", "again, by mistake"]) == EXIT_OK
    out = capsys.readouterr().out
    assert loaded(db) == ["fixed-1", "fixed-2"]
    assert quarantined(db) == {
        "fixed-1": ("processing failed 5 times: KeyError", True),
        "fixed-2": ("processing failed 5 times: KeyError", True),
        "bad-1": ("missing required field 'ip'", False),
        "bad-2": ("body is not valid JSON (at character 0)", False),
    }
    assert "replay: 2 quarantined messages examined" in out
    assert [a[3:6] for a in audits(db)[1:]] == [(4, 2, 2), (2, 0, 2)]  # the second saw only bad-1, bad-2


def test_a_dry_run_on_a_schema_behind_leaves_it_behind_and_says_so(etl_env, capsys) -> None:
    # GIVEN a quarantined message on a schema one version behind this release's
    db = etl_env["DATABASE_URL"]
    quarantine(etl_env, [("fixed-1", "processing failed 5 times: KeyError", login(1))])
    behind = SCHEMA_VERSION - 1
    query(
        db,
        "INSERT INTO etl_schema_version (version) VALUES (%s); DELETE FROM etl_schema_version WHERE version = %s",
        (behind, SCHEMA_VERSION),
    )
    # WHEN an operator looks first
    code = main(["replay", "--reason", "look first", "--dry-run"])
    # THEN nothing changed, the schema included, and the one line says why and what to do
    assert query(db, "SELECT max(version) FROM etl_schema_version") == [(behind,)]
    assert code == EXIT_CONFIG
    assert query(db, "SELECT to_regclass('etl_replay_audit') IS NULL") == [(True,)]
    assert loaded(db) == [] and quarantined(db) == {"fixed-1": ("processing failed 5 times: KeyError", False)}
    err = capsys.readouterr().err
    assert f"at version {behind}" in err and "does not migrate" in err and "Nothing was changed" in err
    # A replay (not a dry run) brings it up to date first, as the ETL does at start.
    assert main(["replay", "--reason", "load it"]) == EXIT_OK
    assert query(db, "SELECT max(version) FROM etl_schema_version") == [(SCHEMA_VERSION,)]
    assert loaded(db) == ["fixed-1"]


def test_a_dry_run_on_a_database_never_migrated_creates_nothing(etl_env, capsys) -> None:
    assert main(["replay", "--reason", "look first", "--dry-run"]) == EXIT_CONFIG
    assert "is not created" in capsys.readouterr().err
    assert query(etl_env["DATABASE_URL"], "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()") == [
        (0,)
    ]


def test_where_reason_and_since_choose_the_rows(etl_env) -> None:
    db = etl_env["DATABASE_URL"]
    quarantine(
        etl_env,
        [
            ("old-poison", "processing failed 5 times: KeyError", login(1)),
            ("new-poison", "processing failed 5 times: KeyError", login(2)),
            ("new-other", "refused by PostgreSQL: 23514 check", login(3)),
        ],
    )
    query(db, "UPDATE user_logins_rejected SET received_at = now() - interval '3 days' WHERE message_id = 'old-poison'")
    assert main(["replay", "--reason", "r", "--where-reason", "processing failed%", "--since", "1d"]) == EXIT_OK
    assert loaded(db) == ["new-poison"]
    since = (datetime.now(timezone.utc) - timedelta(days=7)).date().isoformat()
    assert main(["replay", "--reason", "r", "--where-reason", "PROCESSING%", "--since", since]) == EXIT_OK
    assert loaded(db) == ["new-poison", "old-poison"]


def test_without_an_audit_row_nothing_moves_and_the_exit_code_is_3(etl_env, capsys) -> None:
    db = etl_env["DATABASE_URL"]
    quarantine(etl_env, [("fixed-1", "processing failed 5 times: KeyError", login(1))])
    assert main(["replay", "--reason", "creates the audit table", "--dry-run"]) == EXIT_OK
    query(
        db,
        """CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'audit store full'; END $$;
                 CREATE TRIGGER refuse BEFORE INSERT ON etl_replay_audit FOR EACH ROW EXECUTE FUNCTION refuse()""",
    )
    capsys.readouterr()
    assert main(["replay", "--reason", "should not move"]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "refusing to replay without an audit record" in err and "audit store full" in err
    assert loaded(db) == [] and quarantined(db) == {"fixed-1": ("processing failed 5 times: KeyError", False)}


def test_replay_beside_a_running_drain_and_another_replay_stores_every_message_once(
    etl_env, sqs_client, tmp_path
) -> None:
    db = etl_env["DATABASE_URL"]
    poisoned = [(f"q-{n:04d}", "processing failed 5 times: RuntimeError", login(10_000 + n)) for n in range(400)]
    quarantine(etl_env, poisoned)
    ids = send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(400)])
    # One receiver, batches of 10: a drain of ~40 commits, which the replays run in the middle of.
    drain = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--wait-seconds", "1", "--receivers", "1", "--batch-size", "10"],
        cwd=tmp_path,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not query(db, "SELECT 1 FROM user_logins LIMIT 1"):  # the drain is committing
        assert time.monotonic() < deadline and drain.poll() is None
        time.sleep(0.05)
    masker = masker_of(etl_env)
    results: list[ReplayResult | Exception] = []

    def replay(who: str) -> None:
        replayer = Replayer(db, lambda m, b, s: retry_quarantined(m, b, s, masker), batch_rows=50)
        try:
            results.append(replayer.run(ReplayRequest(who, "beside the drain")))
        except Exception as exc:  # noqa: BLE001 - handed to the test
            results.append(exc)

    threads = [threading.Thread(target=replay, args=(who,)) for who in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert drain.poll() is None, "the drain ended before the replays: they did not run beside it"
    out, err = drain.communicate(timeout=120)
    assert drain.returncode == 0, err
    assert len(results) == 2 and not [r for r in results if isinstance(r, Exception)], results
    assert sum(r.loaded for r in results if isinstance(r, ReplayResult)) == 400
    stored = loaded(db)
    assert len(stored) == len(set(stored)) == 800
    assert set(stored) == set(ids) | {m for m, _, _ in poisoned}
    # One table per message: in user_logins, or quarantined and not replayed; never both.
    assert query(
        db,
        """SELECT count(*) FROM user_logins l JOIN user_logins_rejected r USING (message_id)
                         WHERE r.replayed_at IS NULL""",
    ) == [(0,)]
    assert query(db, "SELECT count(*) FROM user_logins_rejected WHERE replayed_at IS NOT NULL") == [(400,)]


def test_nothing_of_a_body_reaches_the_output_the_logs_or_the_audit(etl_env, tmp_path) -> None:
    db = etl_env["DATABASE_URL"]
    secret_ip, secret_device, marker = "203.0.113.77", "777-66-5555", "TOP-SECRET-MARKER"
    quarantine(
        etl_env,
        [
            ("fixed", "processing failed 5 times: KeyError", login(1, ip=secret_ip, device_id=secret_device)),
            ("still-bad", "old", json.dumps({"ip": secret_ip, "device_id": secret_device, "note": marker})),
            ("not-json", "old", f"{marker} {secret_ip}"),
        ],
    )
    outputs = []
    for extra in (["--dry-run"], []):
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "main.py"),
                "-v",
                "--log-format",
                "json",
                "replay",
                "--reason",
                "check leaks",
                *extra,
            ],
            cwd=tmp_path,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    assert "replay audited" in outputs[1]
    for secret in (secret_ip, secret_device, marker, etl_env["MASKING_KEY"]):
        assert all(secret not in text for text in outputs)
        assert query(
            db, "SELECT count(*) FROM etl_replay_audit WHERE row(etl_replay_audit.*)::text LIKE %s", (f"%{secret}%",)
        ) == [(0,)]
        assert query(db, "SELECT count(*) FROM user_logins_rejected WHERE reason LIKE %s", (f"%{secret}%",)) == [(0,)]
    assert loaded(db) == ["fixed"]


def test_a_replay_overtaken_between_its_audit_and_its_move_skips_what_the_other_moved(etl_env) -> None:
    db = etl_env["DATABASE_URL"]
    quarantine(etl_env, [(f"q-{n}", "processing failed 5 times: KeyError", login(n)) for n in range(30)])
    masker = masker_of(etl_env)

    def retry(message_id, body, sent_at):
        return retry_quarantined(message_id, body, sent_at, masker)

    class Overtaken(Replayer):
        def _move(self, conn, result, audited):
            # Bob replays everything after Alice's audit and before her move.
            self.bob = Replayer(db, retry, batch_rows=7).run(ReplayRequest("bob", "second"))
            super()._move(conn, result, audited)

    alice = Overtaken(db, retry, batch_rows=7)
    result = alice.run(ReplayRequest("alice", "first"))
    assert (alice.bob.loaded, result.to_load, result.loaded) == (30, 30, 0)
    assert (result.already_loaded, result.skipped) == (0, 30)
    assert len(loaded(db)) == 30
    assert query(
        db,
        "SELECT a.requested_by, count(*) FROM user_logins_rejected r "
        "JOIN etl_replay_audit a ON a.id = r.replay_audit_id GROUP BY 1",
    ) == [("bob", 30)]


# --- replay and the same message_id stored by someone else -------------------------------------------


def test_a_quarantined_message_already_in_user_logins_is_stored_once_and_reported_as_already_there(
    etl_env, capsys
) -> None:
    # GIVEN quarantined messages whose logins are already stored: one was stored by a redelivery
    # (same day), the other's quarantine row is the minimal form without a sent time, while its
    # login was stored under its real day (a row of the default partition would be a second copy).
    db = etl_env["DATABASE_URL"]
    masker = masker_of(etl_env)
    sent = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    writer = PostgresWriter(db)
    writer.connect()
    bodies = {"dated": login(1), "undated": login(2)}
    writer.write(
        [],
        [
            Rejection(
                "dated", "processing failed 5 times: KeyError", masker.mask(BODY_FIELD, bodies["dated"]), sent, 5
            ),
            Rejection("undated", "quarantine row refused", masker.mask(BODY_FIELD, bodies["undated"]), None, 1),
        ],
    )
    writer.close()
    # Their logins, dated by their SentTimestamp, COPYed as a release before schema 8 could store
    # them beside a quarantine row (two consumers at once); PostgresWriter now refuses to.
    stored = [retry_quarantined(m, masker.mask(BODY_FIELD, body), sent, masker) for m, body in bodies.items()]
    with closing(psycopg2.connect(db)) as conn, conn, conn.cursor() as cur:
        rows = [row for row in stored if isinstance(row, MaskedLogin)]
        cur.copy_expert(f"COPY user_logins ({COLUMN_LIST}) FROM STDIN", io.StringIO(copy_text(rows)))

    # WHEN they are replayed
    assert main(["replay", "--reason", "INC-7"]) == EXIT_OK

    # THEN each is in user_logins once, counted as already there, and its quarantine row is history
    assert "loaded into user_logins: 0 (already there: 2)" in capsys.readouterr().out
    assert query(db, "SELECT message_id, create_date FROM user_logins ORDER BY 1") == [
        ("dated", sent.date()),
        ("undated", sent.date()),
    ]
    assert quarantined(db) == {
        "dated": ("processing failed 5 times: KeyError", True),
        "undated": ("quarantine row refused", True),
    }


class PausedReplayer(Replayer):
    """A replay that tells its backend's pid, and can hold its first chunk's transaction open
    after the insert into user_logins (before its commit)."""

    def __init__(self, *args: Any, hold: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold = hold
        self.pid = 0
        self.inserted = threading.Event()
        self.release = threading.Event()

    def _move(self, conn: Any, result: ReplayResult, audited: Any) -> None:
        self.pid = conn.get_backend_pid()
        super()._move(conn, result, audited)

    def _load(self, cur: Any, logins: Any, result: ReplayResult) -> None:
        super()._load(cur, logins, result)
        self.inserted.set()
        if self.hold:
            assert self.release.wait(60), "the test never released the replay"


def start_drain(tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--wait-seconds", "1", "--receivers", "1", "--flush-seconds", "1"],
        cwd=tmp_path,
        env=os.environ.copy(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_blocked_by(db: str, blocker: int) -> int:
    """Wait until a backend waits for a lock that backend `blocker` holds; return its pid."""
    deadline = time.monotonic() + 30
    while True:
        # (not the drain's token indexer: its CREATE INDEX CONCURRENTLY waits for older snapshots too)
        rows = query(
            db,
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid)) "
            "AND application_name <> 'login-etl-token-indexer'",
            (blocker,),
        )
        if rows:
            return int(rows[0][0])
        assert time.monotonic() < deadline, f"nothing waited for backend {blocker}"
        time.sleep(0.05)


def run_in_thread(work: Callable[[], ReplayResult]) -> tuple[threading.Thread, list[ReplayResult | BaseException]]:
    out: list[ReplayResult | BaseException] = []

    def target() -> None:
        try:
            out.append(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def test_a_replay_and_a_drain_storing_the_same_message_at_once_store_it_once_replay_first(
    etl_env, sqs_client, tmp_path
) -> None:
    # GIVEN a quarantined message whose message_id the queue delivers to a drain
    db = etl_env["DATABASE_URL"]
    body = login(1)
    [message_id] = send(sqs_client, etl_env["SQS_QUEUE_URL"], [body])
    masker = masker_of(etl_env)
    writer = PostgresWriter(db)
    writer.connect()
    sent = datetime.now(timezone.utc)  # the same day as SQS's SentTimestamp: the same partition
    writer.write(
        [], [Rejection(message_id, "processing failed 5 times: KeyError", masker.mask(BODY_FIELD, body), sent, 5)]
    )
    writer.close()
    # WHEN the replay has inserted it, uncommitted, and the drain's COPY of it waits for that
    replayer = PausedReplayer(db, lambda m, b, s: retry_quarantined(m, b, s, masker), hold=True)
    thread, results = run_in_thread(lambda: replayer.run(ReplayRequest("alice", "race")))
    assert replayer.inserted.wait(30), results
    drain = start_drain(tmp_path)
    try:
        wait_until_blocked_by(db, replayer.pid)
    finally:
        replayer.release.set()
    thread.join(timeout=60)
    out, err = drain.communicate(timeout=60)
    # THEN the message is stored once: the replay's row; the drain counted a duplicate
    assert drain.returncode == 0, err
    [result] = results
    assert isinstance(result, ReplayResult) and (result.loaded, result.already_loaded) == (1, 0)
    assert loaded(db) == [message_id]
    assert quarantined(db) == {message_id: ("processing failed 5 times: KeyError", True)}
    assert "Traceback" not in err


def test_a_replay_and_a_drain_storing_the_same_message_at_once_store_it_once_drain_first(
    etl_env, sqs_client, tmp_path
) -> None:
    # GIVEN a quarantined message M whose message_id the queue delivers to a drain, with a bad
    # message R in the same receive (its quarantine row is how the test holds the drain's batch open)
    db = etl_env["DATABASE_URL"]
    body = login(1)
    message_id, bad_id = send(sqs_client, etl_env["SQS_QUEUE_URL"], [body, "not json"])
    masker = masker_of(etl_env)
    writer = PostgresWriter(db)
    writer.connect()
    sent = datetime.now(timezone.utc)
    writer.write(
        [], [Rejection(message_id, "processing failed 5 times: KeyError", masker.mask(BODY_FIELD, body), sent, 5)]
    )
    writer.close()
    holder = psycopg2.connect(db)
    try:
        with holder.cursor() as cur:  # an uncommitted quarantine row for R: the drain's insert of R waits
            cur.execute(
                "INSERT INTO user_logins_rejected (message_id, reason, receive_count, encrypted_body) "
                "VALUES (%s, 'held by the test', 1, 'x')",
                (bad_id,),
            )
        # WHEN the drain has copied M into user_logins (uncommitted, waiting on R) and the replay's
        # insert of M waits for the drain
        drain = start_drain(tmp_path)
        drain_pid = wait_until_blocked_by(db, holder.get_backend_pid())
        replayer = PausedReplayer(db, lambda m, b, s: retry_quarantined(m, b, s, masker))
        thread, results = run_in_thread(lambda: replayer.run(ReplayRequest("alice", "race")))
        assert wait_until_blocked_by(db, drain_pid) == replayer.pid, results
    finally:
        holder.rollback()  # R goes in, the drain commits
        holder.close()
    thread.join(timeout=60)
    out, err = drain.communicate(timeout=60)
    # THEN M is stored once, by the drain; the replay counts it as already there and marks it
    assert drain.returncode == 0, err
    [result] = results
    assert isinstance(result, ReplayResult) and (result.loaded, result.already_loaded) == (0, 1)
    assert loaded(db) == [message_id]
    assert quarantined(db)[message_id] == ("processing failed 5 times: KeyError", True)
    assert quarantined(db)[bad_id][1] is False
