"""Hostile input through the real pipeline: every message loaded or quarantined, nothing leaks.

The bodies are tests/strategies.py's; tests/unit/test_hostile_bodies.py runs the same strategy
through parsing and masking alone, under the hypothesis profile (500 examples in CI). Here each
example is a whole ETL run against the real services, so the count stays small and fixed.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from database.sqs_postgres import PostgresWriter
from helpers import assert_exactly_once, dump_schema, output, query, queue_counts, start_etl
from tests.strategies import bodies, pii_markers

pytestmark = pytest.mark.slow


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(batch=st.lists(bodies, min_size=20, max_size=60))
def test_any_body_is_loaded_or_quarantined_and_no_pii_leaks(etl_env, sqs_client, tmp_path, batch) -> None:
    queue_url = etl_env["SQS_QUEUE_URL"]
    ids = [sqs_client.send_message(QueueUrl=queue_url, MessageBody=body)["MessageId"] for body in batch]
    markers = {m for body in batch for m in pii_markers(body)}
    writer = PostgresWriter(etl_env["DATABASE_URL"])
    writer.connect()  # the tables exist from the first example on (idempotent)
    writer.close()
    previous = {
        r[0]
        for r in query(
            etl_env["DATABASE_URL"],
            "SELECT message_id FROM user_logins UNION ALL SELECT message_id FROM user_logins_rejected",
        )
    }

    process = start_etl(tmp_path, "-v")
    assert process.wait(timeout=120) == 0, output(tmp_path)[-3000:]

    assert queue_counts(sqs_client, queue_url) == (0, 0)
    assert_exactly_once(etl_env["DATABASE_URL"], [*previous, *ids])
    dump = dump_schema(etl_env["DATABASE_URL"])
    logs = output(tmp_path)
    assert [m for m in markers if m in dump or m in logs] == []
