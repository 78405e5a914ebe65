"""The writer's statements use the indexes, whatever the size of the day: read from PostgreSQL's own
plans (auto_explain, each plan sent back to the session as a NOTICE), of the statements the writer
really runs, on a partition of 20,000 rows.

A sequential scan of the day's partition in the quarantine INSERT made every batch that held one
rejection read the whole day (90 ms a batch at 100,000 rows, growing with the day): the planner,
knowing nothing of the session's staging table, hashed the partition for the NOT EXISTS. Such a
plan is invisible to a functional test and to a short benchmark, hence this test.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn

from database.sqs_postgres import VALUES_MAX_ROWS, PostgresWriter
from etl.transform import reject, transform
from models import ReceivedMessage, Rejection
from tests.fakes import MASKER, body

pytestmark = pytest.mark.slow

ROWS = 20_000
EXPLAINED = (
    "-c session_preload_libraries=auto_explain -c auto_explain.log_min_duration=0 -c auto_explain.log_level=notice"
)


def _sent_ms() -> int:
    return int(datetime.now(timezone.utc).timestamp() * 1000)


def _rows(count: int, *, redelivered: bool = False) -> list:
    sent = _sent_ms()
    rows = []
    for n in range(count):
        message = ReceivedMessage(str(uuid.uuid4()), "h", body(n), sent, receive_count=2 if redelivered else 1)
        rows.append(transform(message, MASKER))
    return rows


def _rejections(count: int, *, dated: bool = True) -> list[Rejection]:
    sent = _sent_ms() if dated else None
    return [
        reject(ReceivedMessage(str(uuid.uuid4()), "h", "not json", sent), MASKER, "x", "not_json") for _ in range(count)
    ]


@pytest.fixture
def full_day(database_url: str) -> str:
    """The schema, and today's partition holding ROWS logins and the quarantine 2,000 rows; analyzed."""
    writer = PostgresWriter(database_url)
    writer.connect()
    try:
        for _ in range(ROWS // 1000):
            writer.write(_rows(1000), _rejections(100))
    finally:
        writer.close()
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("ANALYZE")
    conn.close()
    return database_url


def _plans_of(database_url: str, write) -> str:
    """Every plan of the statements `write(writer)` runs, as auto_explain printed them."""
    given = parse_dsn(database_url)
    explained = make_dsn(database_url, options=f"{given.get('options', '')} {EXPLAINED}".strip())
    writer = PostgresWriter(explained)
    writer.connect()
    try:
        conn = writer._conn  # noqa: SLF001 - the session whose NOTICEs hold the plans
        assert conn is not None
        conn.notices = []
        write(writer)
        return "\n".join(conn.notices)
    finally:
        writer.close()


@pytest.mark.parametrize("dated", [True, False], ids=["dated", "undated"])
@pytest.mark.parametrize("count", [10, VALUES_MAX_ROWS + 1], ids=["values", "staged"])
def test_the_quarantine_insert_probes_the_day_by_index(full_day: str, dated: bool, count: int) -> None:
    plans = _plans_of(full_day, lambda writer: writer.write(_rows(1000 - count), _rejections(count, dated=dated)))
    assert "INSERT INTO user_logins_rejected" in plans, "auto_explain printed no plan of the quarantine insert"
    today = f"user_logins_p{datetime.now(timezone.utc):%Y%m%d}"  # the full one (the others are empty)
    assert f"Seq Scan on {today} " not in plans, plans


def test_the_staged_login_insert_probes_the_quarantine_by_index(full_day: str) -> None:
    plans = _plans_of(full_day, lambda writer: writer.write(_rows(1000, redelivered=True), [], redelivered=True))
    assert "INSERT INTO user_logins (" in plans, "auto_explain printed no plan of the staged insert"
    assert "Seq Scan on user_logins_rejected" not in plans, plans
