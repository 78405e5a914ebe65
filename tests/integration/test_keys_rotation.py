"""Rotation v1 -> v2: rows of both versions, `rekey` (also killed and resumed), retiring the old key.

The rows of v1 written straight into the tables are of the legacy format (``v1.`` + base64url of the
unpadded text), as the ETL wrote them before Tink's format: `rekey` migrates them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

from cli.exit_codes import EXIT_OK, EXIT_UNMASK_FAILED
from database.sqs_postgres import PostgresWriter
from helpers import GOOD_LOGIN, login, query, send
from main import main
from models import MaskedLogin
from pii.masking import Masker, decode_key, generate_key, token_version
from tests.legacy_tokens import legacy_token

ROOT = Path(__file__).resolve().parents[2]
K1, K2 = generate_key(), generate_key()
V2 = Masker(decode_key(K2), version=2)
DEVICES = [f"555-01-{1000 + n}" for n in range(5)]
IS_V2 = "left({0}, 7) = ANY(%s)"  # a token of key 2 in Tink's format (see Masker.current_prefixes)


def v1(field: str, value: str) -> str:
    """A legacy-format token of key version 1."""
    return legacy_token(decode_key(K1), 1, field, value)


def use_keyring(monkeypatch, keys: str, version: str | None) -> None:
    monkeypatch.delenv("MASKING_KEY", raising=False)
    monkeypatch.setenv("MASKING_KEYS", keys)
    if version is None:
        monkeypatch.delenv("MASKING_KEY_VERSION", raising=False)
    else:
        monkeypatch.setenv("MASKING_KEY_VERSION", version)


def batch(start: int, count: int) -> list[str]:
    """Good logins that reuse five devices, and one malformed body (quarantined, encrypted)."""
    bodies = [login(n, device_id=DEVICES[n % 5]) for n in range(start, start + count)]
    return [*bodies, json.dumps({**GOOD_LOGIN, "ip": f"203.0.113.{start}", "user_id": start})]


def test_rotation_rekey_and_retirement_from_the_cli(etl_env, sqs_client, monkeypatch, capsys) -> None:
    db = etl_env["DATABASE_URL"]
    # GIVEN rows masked under v1, then more rows masked under v2 once the keyring was rotated
    monkeypatch.setenv("MASKING_KEY", K1)
    send(sqs_client, etl_env["SQS_QUEUE_URL"], batch(0, 10))
    assert main([]) == EXIT_OK
    use_keyring(monkeypatch, f"1:{K1},2:{K2}", "2")
    send(sqs_client, etl_env["SQS_QUEUE_URL"], batch(10, 10))
    assert main([]) == EXIT_OK
    tokens = [token for (token,) in query(db, "SELECT masked_device_id FROM user_logins")]
    assert Counter(map(token_version, tokens)) == {1: 10, 2: 10}
    assert query(db, "SELECT count(DISTINCT masked_device_id) FROM user_logins") == [(10,)]  # split in two
    old_ip = query(db, "SELECT masked_ip FROM user_logins WHERE user_id = 'user-3'")[0][0]
    new_ip = query(db, "SELECT masked_ip FROM user_logins WHERE user_id = 'user-13'")[0][0]
    # WHEN tokens of both versions are unmasked
    capsys.readouterr()
    assert main(["unmask", "--reason", "rotation test", old_ip, new_ip]) == EXIT_OK
    # THEN both read back
    assert capsys.readouterr().out.splitlines() == ["10.0.0.3", "10.0.0.13"]

    # WHEN rekey runs
    assert main(["rekey", "--batch-size", "3"]) == EXIT_OK
    # THEN every token is of v2, exactly the token v2 makes today, so the duplicates line up again
    # 10 v1 rows x 3 (ip, device, network) + 1 rejected body
    assert "rekeyed 31 tokens to version 2" in capsys.readouterr().out
    rows = query(db, "SELECT user_id, masked_ip, masked_device_id, masked_network FROM user_logins ORDER BY user_id")
    assert len(rows) == 20
    for user_id, masked_ip, masked_device_id, masked_network in rows:
        n = int(user_id.split("-")[1])
        assert masked_ip == V2.mask("ip", f"10.0.0.{n}")
        assert masked_device_id == V2.mask("device_id", DEVICES[n % 5])
        assert masked_network == V2.mask_network("10.0.0.0")  # the one /24 of all twenty
    assert query(db, "SELECT count(DISTINCT masked_device_id) FROM user_logins") == [(5,)]
    bodies = [V2.unmask(token) for (token,) in query(db, "SELECT encrypted_body FROM user_logins_rejected")]
    assert sorted(json.loads(b)["ip"] for b in bodies) == ["203.0.113.0", "203.0.113.10"]

    # WHEN the old key is retired
    use_keyring(monkeypatch, f"2:{K2}", None)
    # THEN a saved v1 token says which version is missing; a rekey finds nothing left to do
    assert main(["unmask", "--reason", "retired key test", old_ip]) == EXIT_UNMASK_FAILED
    err = capsys.readouterr().err
    assert "key version 1, which this keyring does not hold (it holds 2)" in err and "Traceback" not in err
    assert main(["rekey"]) == EXIT_OK
    assert "rekeyed 0 tokens" in capsys.readouterr().out


def insert_v1_rows(database_url: str, count: int, legacy: int) -> None:
    """`count` ETL rows and `legacy` rows of the original exercise (NULL message_id), all under v1."""
    writer = PostgresWriter(database_url)
    writer.connect()
    rows = [
        MaskedLogin(
            f"m-{n}",
            f"user-{n}",
            "ios",
            v1("ip", f"10.1.{n % 97 // 256}.{n % 97}"),
            v1("device_id", f"device-{n % 50}"),
            None,
            "1.0",
            date(2024, 1, 1),
        )
        for n in range(count)
    ]
    writer.write(rows, [])
    writer.close()
    if not legacy:
        return
    values = ", ".join(
        f"('legacy-{n}', 'android', '{v1('ip', f'192.0.2.{n}')}', "
        f"'{v1('device_id', f'legacy-device-{n}')}', '0.96', '2020-01-01')"
        for n in range(legacy)
    )
    query(
        database_url,
        "INSERT INTO user_logins (user_id, device_type, masked_ip, masked_device_id, app_version, "
        f"create_date) VALUES {values}",
    )


def count_v2(database_url: str) -> int:
    return query(
        database_url,
        f"SELECT count(*) FROM user_logins WHERE {IS_V2.format('masked_ip')}",
        (list(V2.current_prefixes),),
    )[0][0]


def duplicates(database_url: str) -> list[tuple[str, int, int]]:
    """What the analysts' duplicates view says, without the tokens (which rekey changes)."""
    return sorted(query(database_url, "SELECT field, logins, users FROM user_login_duplicates"))


def test_a_rekey_killed_with_sigkill_keeps_its_committed_batches_and_a_rerun_finishes(database_url, tmp_path):
    # GIVEN 600 rows of legacy v1 tokens (50 devices, 97 IPs) plus 5 rows without message_id, and
    # updates slowed to 5 ms a row
    insert_v1_rows(database_url, 600, legacy=5)
    before = duplicates(database_url)
    assert len(before) == 50 + 97
    query(
        database_url,
        """
        CREATE FUNCTION slow_down() RETURNS trigger LANGUAGE plpgsql AS
            'BEGIN PERFORM pg_sleep(0.005); RETURN NEW; END';
        CREATE TRIGGER slow_down BEFORE UPDATE ON user_logins FOR EACH ROW EXECUTE FUNCTION slow_down()""",
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("MASKING_KEY")}
    env.update(DATABASE_URL=database_url, MASKING_KEYS=f"1:{K1},2:{K2}", MASKING_KEY_VERSION="2")
    # WHEN rekey runs in batches of ~20 rows and is SIGKILLed after a few batches committed
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "rekey", "--batch-size", "20"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while count_v2(database_url) < 60 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    # THEN the committed batches are kept, the open one is rolled back whole
    done = count_v2(database_url)
    assert process.returncode == -signal.SIGKILL and 60 <= done < 605
    assert query(
        database_url,
        f"SELECT count(*) FROM user_logins WHERE ({IS_V2.format('masked_ip')}) <> ({IS_V2.format('masked_device_id')})",
        (list(V2.current_prefixes),) * 2,
    ) == [(0,)]
    # WHEN it is run again
    query(database_url, "DROP TRIGGER slow_down ON user_logins")
    rerun = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "rekey"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # THEN it finishes the rest, legacy rows included, and every value is intact
    assert rerun.returncode == EXIT_OK, rerun.stderr
    assert f"rekeyed {2 * (605 - done)} tokens to version 2" in rerun.stdout
    assert "0 tokens of other versions left" in rerun.stdout
    rows = query(database_url, "SELECT user_id, masked_ip, masked_device_id FROM user_logins")
    assert len(rows) == 605
    for user_id, masked_ip, masked_device_id in rows:
        kind, n = user_id.split("-")
        if kind == "legacy":
            assert (V2.unmask(masked_ip), V2.unmask(masked_device_id)) == (f"192.0.2.{n}", f"legacy-device-{n}")
        else:
            assert V2.unmask(masked_device_id) == f"device-{int(n) % 50}" and V2.is_current(masked_ip)
            assert V2.unmask(masked_ip) == f"10.1.0.{int(n) % 97}"
    # and the duplicates line up exactly as before: one token per device and per IP again
    assert duplicates(database_url) == before


def test_rekey_beside_a_writing_etl_leaves_no_old_token(db_env, monkeypatch) -> None:
    database_url = db_env
    # GIVEN v1 rows, and an ETL that keeps inserting v2 rows meanwhile
    insert_v1_rows(database_url, 2000, legacy=0)
    use_keyring(monkeypatch, f"1:{K1},2:{K2}", "2")
    stop = threading.Event()
    written: list[int] = []

    def etl() -> None:
        writer = PostgresWriter(database_url)
        writer.connect()
        while not stop.is_set():
            n = 10_000 + len(written)
            writer.write(
                [
                    MaskedLogin(
                        f"m-{n}",
                        "u",
                        "android",
                        V2.mask("ip", str(n)),
                        V2.mask("device_id", str(n)),
                        None,
                        "1",
                        date(2024, 1, 2),
                    )
                ],
                [],
            )
            written.append(n)
        writer.close()

    thread = threading.Thread(target=etl)
    thread.start()
    try:
        while len(written) < 10:
            time.sleep(0.01)
        before = len(written)
        # WHEN rekey runs
        assert main(["rekey", "--batch-size", "10"]) == EXIT_OK
        during = len(written) - before
    finally:
        stop.set()
        thread.join()
    # THEN the ETL kept writing, no token of v1 is left and nothing was lost
    assert during > 10
    assert query(
        database_url,
        f"SELECT count(*) FROM user_logins WHERE NOT {IS_V2.format('masked_ip')} "
        f"OR NOT {IS_V2.format('masked_device_id')}",
        (list(V2.current_prefixes),) * 2,
    ) == [(0,)]
    assert query(database_url, "SELECT count(*) FROM user_logins") == [(2000 + len(written),)]


def test_rekey_leaves_and_reports_what_it_cannot_rewrite(db_env, monkeypatch, capsys) -> None:
    database_url = db_env
    # GIVEN a v1 row, a row of the original exercise holding no token, and a row of an unknown v7
    insert_v1_rows(database_url, 1, legacy=0)
    v7 = Masker(decode_key(generate_key()), version=7)
    query(
        database_url,
        "INSERT INTO user_logins (user_id, masked_ip, masked_device_id) VALUES "
        f"('old', 'x', 'y'), ('v7', '{v7.mask('ip', '1.1.1.1')}', '{v7.mask('device_id', 'd')}')",
    )
    use_keyring(monkeypatch, f"1:{K1},2:{K2}", "2")
    # WHEN rekey runs
    assert main(["rekey"]) == EXIT_UNMASK_FAILED
    # THEN it rewrites what it can and names why the rest stays, without a value
    out, err = capsys.readouterr()
    assert "rekeyed 2 tokens to version 2" in out and "4 tokens of other versions left" in out
    assert "error: 2 token(s) not rewritten: not a masked token" in err
    assert "error: 2 token(s) not rewritten: token is of key version 7" in err
    assert query(database_url, "SELECT masked_ip FROM user_logins WHERE user_id = 'old'") == [("x",)]
