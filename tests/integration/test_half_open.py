"""Half-open connections: PostgreSQL black-holed mid-run (every packet silently dropped, as behind a
dead NAT, a firewall that forgot the connection, or a failover; TcpProxy.blackhole). A call over such
a connection must fail within the TCP settings every connection gets (database/sqs_postgres.py), not
after the kernel's ~15 minutes of retransmissions, so that a stop ends before the orchestrator's
SIGKILL. The Lambda handler's side is in test_lambda_handler.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cli.exit_codes import EXIT_STOPPED_UNCOMMITTED
from database.connection import TCP_USER_TIMEOUT_MS
from database.sqs_postgres import PostgresWriter
from helpers import (
    assert_exactly_once,
    drain_until_empty,
    login,
    output,
    query,
    queue_counts,
    send,
    set_visibility,
    start_etl,
    unavailable,
)
from proxy import TcpProxy, blackhole_unavailable

# The writer's connect timeout (PostgresWriter's default): a reconnect into the black hole takes this long.
CONNECT_TIMEOUT_SECONDS = 5


@pytest.fixture
def blackhole_proxy(pg_admin_url: str) -> Iterator[TcpProxy]:
    """A proxy to PostgreSQL on an address of its own, ready to be black-holed; closed afterwards."""
    reason = blackhole_unavailable()
    if reason is not None:
        unavailable(f"a network black hole needs {reason}")
    proxy = TcpProxy.private("127.0.0.1", urlsplit(pg_admin_url).port or 5432)
    yield proxy
    proxy.close()


def test_every_connection_gets_keepalives_and_a_tcp_user_timeout_unless_the_dsn_sets_them(database_url: str) -> None:
    writer = PostgresWriter(f"{database_url}&keepalives_idle=42")
    try:
        writer.connect(migrate=False)
        assert writer._conn is not None
        params = writer._conn.get_dsn_parameters()
    finally:
        writer.close()
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "42"  # the operator's value, not ours
    assert int(params["keepalives_interval"]) * int(params["keepalives_count"]) > 0
    assert params["tcp_user_timeout"] == str(TCP_USER_TIMEOUT_MS)


def test_a_statement_timeout_is_added_to_the_options_of_the_dsn_and_never_replaces_theirs(database_url: str) -> None:
    def session(dsn: str) -> tuple[str, str]:
        writer = PostgresWriter(dsn)
        try:
            writer.connect(migrate=False, statement_timeout_seconds=2.5)
            assert writer._conn is not None
            with writer._conn.cursor() as cur:
                cur.execute("SELECT current_setting('statement_timeout'), current_schema()")
                row = cur.fetchone()
                assert row is not None
                return row[0], row[1]
        finally:
            writer.close()

    (schema,) = query(database_url, "SELECT current_schema()")[0]
    assert session(database_url) == ("2500ms", schema)  # the DSN's own options (search_path) kept
    mine = database_url.replace("options=", "options=-cstatement_timeout%3D1234%20", 1)
    assert session(mine) == ("1234ms", schema)


@pytest.mark.slow
def test_a_stop_while_postgresql_is_black_holed_exits_in_time_and_a_drain_stores_everything_once(
    etl_env: dict[str, str], sqs_client, tmp_path: Path, blackhole_proxy: TcpProxy
) -> None:
    # GIVEN `--follow` writing through a proxy, its connection to PostgreSQL open and idle
    queue_url = etl_env["SQS_QUEUE_URL"]
    set_visibility(sqs_client, queue_url, 5)
    ids = send(sqs_client, queue_url, [login(n) for n in range(300)])
    stop_timeout = 3
    env = {**os.environ, "DATABASE_URL": blackhole_proxy.dsn(etl_env["DATABASE_URL"])}
    process = start_etl(
        tmp_path,
        "--follow",
        "--wait-seconds",
        "1",
        "--batch-size",
        "100",
        "--stop-timeout",
        str(stop_timeout),
        "--backoff-base-seconds",
        "0.05",
        "--backoff-cap-seconds",
        "0.5",
        env=env,
    )
    try:
        _wait_until(lambda: _stored(etl_env["DATABASE_URL"]) == len(ids), "the first messages stored", process)
        # WHEN the network drops every packet, messages arrive (the writer's commit hangs), and SIGTERM comes
        blackhole_proxy.blackhole()
        ids += send(sqs_client, queue_url, [login(n) for n in range(300, 350)])
        _wait_until(lambda: queue_counts(sqs_client, queue_url)[0] == 0, "the new messages received", process)
        time.sleep(1.5)  # past the flush interval: the write is under way
        process.send_signal(signal.SIGTERM)
        # THEN it exits within the stop timeout plus one call cut short by tcp_user_timeout (or one
        # connect timeout), not after the kernel's retransmissions; with exit 5 and one line saying
        # how many messages were left uncommitted
        bound = stop_timeout + TCP_USER_TIMEOUT_MS / 1000 + CONNECT_TIMEOUT_SECONDS + 5
        try:
            code = process.wait(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running {bound:.0f} s after SIGTERM (--stop-timeout {stop_timeout}): {output(tmp_path)}"
            )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = output(tmp_path)
    assert code == EXIT_STOPPED_UNCOMMITTED, text
    uncommitted = [int(n) for n in re.findall(r"(\d+) messages left uncommitted", text)]
    assert len(uncommitted) == 1 and 1 <= uncommitted[0] <= len(ids), text
    assert "Traceback" not in text
    # AND once the network is back, a drain stores every message exactly once
    blackhole_proxy.close()  # ends the proxy's sessions too: nothing is left half-done on the server
    drain_until_empty(tmp_path, sqs_client, queue_url)
    assert_exactly_once(etl_env["DATABASE_URL"], ids)


def _stored(database_url: str) -> int:
    if query(database_url, "SELECT to_regclass('user_logins')") == [(None,)]:
        return 0
    return int(query(database_url, "SELECT count(*) FROM user_logins")[0][0])


def _wait_until(condition: Callable[[], bool], what: str, process: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the ETL exited (code {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
