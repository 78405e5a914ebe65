"""The writer's contract (tests/contract_sink.py) on PostgresWriter over the real PostgreSQL: the
same scenarios run on FakeSink in tests/unit/test_contract_fake.py. Each test has a fresh schema."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import date

import psycopg2
import pytest

from database.sqs_postgres import PostgresWriter
from tests import contract_sink as sink_contract
from tests.contract_sink import OpenSessions, Session, Stored


@pytest.fixture
def database(database_url: str) -> Iterator[tuple[OpenSessions, Stored]]:
    writers: list[PostgresWriter] = []

    def open_sessions(count: int) -> list[Session]:
        for _ in range(count):
            writers.append(PostgresWriter(database_url))
            writers[-1].connect()
        return list(writers[-count:])

    def stored() -> tuple[list[tuple[str, date]], list[str]]:
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT message_id, create_date FROM user_logins")
            logins = [(str(m), d) for m, d in cur.fetchall()]
            cur.execute("SELECT message_id FROM user_logins_rejected ORDER BY 1")
            rejections = [str(m) for (m,) in cur.fetchall()]
        conn.close()
        return logins, rejections

    yield open_sessions, stored
    for writer in writers:
        writer.close()


@pytest.mark.parametrize("scenario", sink_contract.SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_postgres_writer_keeps_the_writers_contract(
    database: tuple[OpenSessions, Stored], scenario: Callable[..., None]
) -> None:
    scenario(*database)
